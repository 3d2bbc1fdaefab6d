# Shared stage rules of the GPU recipes (gpt2-124m, llama-1b, llama-7b). A recipe sets CONFIG (its
# TOML), LAUNCH (how pretrain starts: torchrun or accelerate launch) and GPUS (for `make plan`), then
# includes this file; TP=N overrides the config's tensor-parallel degree. Targets are manifests, so
# `make` re-runs only stale stages and `make -n` prints the pipeline. Nothing is downloaded: the data
# is yours.
#
#   make plan                          the dry run: parameters, tokens, FLOPs, memory per GPU, time
#   make PARQUET=/data/fineweb/        FineWeb-style Parquet shards ("text" column, already filtered):
#                                      dedup -> tokenize -> pretrain -> eval ppl -> sample -> report
#   make WARC="cc/*.warc.gz"           Common Crawl WARC files: crawl-filter first, then the same
#   make ... RESUME=--resume           continue an interrupted pretrain from its last checkpoint
#
# OUT must be on a file system every node sees when the run spans several nodes.
LLMCTL  ?= llmctl
OUT     ?= out
SEED    ?= 0
PARQUET ?=
WARC    ?=
GPU     ?= h100
MFU     ?= 0.4
VOCAB   ?= 32000
RESUME  ?=
RUN     := $(LLMCTL) --seed $(SEED)
# TP= overrides the config's [pretrain] tp for the plan and the training run alike.
TP_FLAG := $(if $(TP),--tp $(TP))

.PHONY: all plan clean check-data
all: $(OUT)/REPORT.md

plan:
	$(RUN) pretrain --config $(CONFIG) --dry-run --vocab-size $(VOCAB) --gpus $(GPUS) $(TP_FLAG) --gpu $(GPU) --mfu $(MFU)

check-data:
	@test -n "$(strip $(PARQUET)$(WARC))" || { echo 'set PARQUET=/path/to/parquet-shards or WARC="a.warc.gz b.warc.gz"' >&2; exit 2; }

ifneq ($(strip $(WARC)),)
DOCS     := $(OUT)/web
DOCS_DEP := $(OUT)/web/manifest.json
$(OUT)/web/manifest.json: $(CONFIG) | check-data
	$(RUN) crawl-filter $(WARC) -o $(OUT)/web --config $(CONFIG) --force
else
DOCS     := $(PARQUET)
DOCS_DEP :=
endif

$(OUT)/dedup/manifest.json: $(DOCS_DEP) $(CONFIG) | check-data
	$(RUN) dedup $(DOCS) -o $(OUT)/dedup --config $(CONFIG) --force

$(OUT)/tokens/manifest.json: $(OUT)/dedup/manifest.json $(CONFIG)
	$(RUN) tokenize $(OUT)/dedup -o $(OUT)/tokens --config $(CONFIG) --force

$(OUT)/base/manifest.json: $(OUT)/tokens/manifest.json $(CONFIG)
	$(LAUNCH) pretrain $(OUT)/tokens -o $(OUT)/base --config $(CONFIG) --force $(TP_FLAG) $(RESUME)

$(OUT)/eval-ppl/manifest.json: $(OUT)/base/manifest.json $(CONFIG)
	$(RUN) eval ppl $(OUT)/base $(OUT)/tokens -o $(OUT)/eval-ppl --config $(CONFIG) --force

$(OUT)/sample.txt: $(OUT)/base/manifest.json
	$(RUN) generate $(OUT)/base "The history of" --config $(CONFIG) > $@.tmp && mv $@.tmp $@

$(OUT)/REPORT.md: $(OUT)/eval-ppl/manifest.json $(OUT)/sample.txt
	$(RUN) report $(OUT) -o $@

clean:
	rm -rf $(OUT)
