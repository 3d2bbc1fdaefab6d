"""The GPU recipes (gpt2-124m, llama-1b, llama-7b): every TOML table resolves into its stage's config,
`make plan` (pretrain --dry-run) runs for each and shows the plan, `make -n` shows the pipeline, and
the shipped accelerate configs are what the Makefiles point at."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core import sizing
from llmctl.core.config import build_config, load_toml
from llmctl.stages.crawl_filter import CrawlFilterConfig
from llmctl.stages.dedup import DedupConfig
from llmctl.stages.evaluate import PerplexityConfig
from llmctl.stages.generate import GenerateConfig
from llmctl.stages.pretrain import PretrainConfig, plan, resolve_micro_batch
from llmctl.stages.tokenize import TokenizeConfig

RECIPES = Path(__file__).parent.parent / "recipes"
GPU_RECIPES = sorted(
    p.parent.name
    for p in RECIPES.glob("*/Makefile")
    if "plan:" in p.read_text() or "common.mk" in p.read_text()
)
SECTIONS = {
    "crawl-filter": CrawlFilterConfig,
    "dedup": DedupConfig,
    "tokenize": TokenizeConfig,
    "pretrain": PretrainConfig,
    "eval-ppl": PerplexityConfig,
    "generate": GenerateConfig,
}


def _make(recipe: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(RECIPES / recipe), "LLMCTL=llmctl", *args],
        capture_output=True,
        text=True,
    )


def test_the_three_gpu_recipes_are_shipped() -> None:
    assert GPU_RECIPES == ["gpt2-124m", "llama-1b", "llama-7b"]


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_every_table_resolves(recipe: str) -> None:
    (toml_path,) = (RECIPES / recipe).glob("*.toml")
    toml = load_toml(toml_path)
    tables = [k for k, v in toml.items() if isinstance(v, dict)]
    assert set(tables) <= set(SECTIONS), f"no stage config for {set(tables) - set(SECTIONS)}"
    for section in tables:
        extra = {"data": ("out/tokens",)} if section == "pretrain" else {}
        build_config(SECTIONS[section], toml, section, **extra)
    pre = build_config(PretrainConfig, toml, "pretrain", data=("out/tokens",))
    tok = build_config(TokenizeConfig, toml, "tokenize")
    if pre.micro_batch == "auto":  # as training would choose it on 64 H100s
        budget = sizing.GPUS["h100"][1]
        pre, _ = resolve_micro_batch(pre, pre.model_config(tok.vocab_size), budget, 64)
    p = plan(pre, tok.vocab_size, world_size=8)  # the batch divides over 8 data-parallel ranks
    assert p["tokens"] >= 20 * p["params"] * 0.99  # the Chinchilla budget


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_make_plan_runs_the_dry_run(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _make(recipe, "-n", "plan")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    argv = shlex.split(line)
    assert argv[0] == "llmctl"
    assert "--dry-run" in argv
    monkeypatch.chdir(RECIPES / recipe)  # the command names the TOML relative to the recipe
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0, res.output
    for part in ("parameters", "FLOPs/token", "GPU-hours", "memory per GPU", "fsdp"):
        assert part in res.output, part


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_make_n_prints_the_pipeline(recipe: str) -> None:
    r = _make(recipe, "-n", "all", "PARQUET=/data/shards")
    assert r.returncode == 0, r.stderr
    stages = [
        next(
            w
            for w in ln.split()
            if w in ("dedup", "tokenize", "pretrain", "eval", "generate", "report")
        )
        for ln in r.stdout.splitlines()
        if "llmctl" in ln and "test -n" not in ln
    ]
    assert stages == ["dedup", "tokenize", "pretrain", "eval", "generate", "report"]
    launch = next(ln for ln in r.stdout.splitlines() if " pretrain " in ln)
    assert ("torchrun" in launch) or ("accelerate launch" in launch)
    r = _make(recipe, "-n", "all", "WARC=a.warc.gz")
    assert "crawl-filter a.warc.gz" in r.stdout


def test_a_run_without_data_says_what_to_set(tmp_path: Path) -> None:
    r = _make("gpt2-124m", "all", f"OUT={tmp_path}/out")
    assert r.returncode != 0
    assert "set PARQUET=" in r.stderr
    assert not (tmp_path / "out").exists()


def test_accelerate_configs() -> None:
    fsdp = yaml.safe_load((RECIPES / "accelerate" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    ds = yaml.safe_load((RECIPES / "accelerate" / "deepspeed-zero3.yaml").read_text())
    assert ds["distributed_type"] == "DEEPSPEED"
    assert ds["deepspeed_config"]["zero_stage"] == 3
    for recipe in ("llama-1b", "llama-7b"):
        r = _make(recipe, "-n", "all", "PARQUET=/data/shards")
        launch = next(ln for ln in r.stdout.splitlines() if " pretrain " in ln)
        assert "--config_file ../accelerate/fsdp.yaml" in launch
        assert "--parallel" not in launch  # set in the TOML: parallel = "fsdp"
    assert load_toml(RECIPES / "llama-7b" / "llama-7b.toml")["pretrain"]["parallel"] == "fsdp"


def test_dry_run_errors() -> None:
    r = CliRunner().invoke(app, ["pretrain", "--dry-run", "--model", "124m"])
    assert r.exit_code == 2
    assert "--vocab-size" in r.output
    r = CliRunner().invoke(
        app, ["pretrain", "--dry-run", "--vocab-size", "32000", "--gpus", "8", "--tp", "3"]
    )
    assert r.exit_code == 2
    assert "must divide" in r.output
    # The global batch must split over the data-parallel ranks: plan() says which value fits.
    r = CliRunner().invoke(
        app,
        ["pretrain", "--dry-run", "--vocab-size", "32000", "--gpus", "3", "--micro-batch", "16"],
    )
    assert r.exit_code == 2
    assert "--batch-tokens" in r.output
