"""recipes/: every config resolves into its stages' configs, and the Makefile's plan is the pipeline."""

from __future__ import annotations

import subprocess
from pathlib import Path

from llmctl.core.config import build_config, load_toml
from llmctl.stages.corpus import CorpusConfig
from llmctl.stages.crawl_filter import CrawlFilterConfig
from llmctl.stages.dedup import DedupConfig
from llmctl.stages.dpo import DPOConfig
from llmctl.stages.generate import GenerateConfig
from llmctl.stages.ppo import PPOConfig
from llmctl.stages.pretrain import PretrainConfig, plan
from llmctl.stages.rm import RMConfig
from llmctl.stages.sft import SFTConfig
from llmctl.stages.tokenize import TokenizeConfig

TINY = Path(__file__).parent.parent / "recipes" / "tiny"


def test_tiny_config_resolves_for_every_stage() -> None:
    toml = load_toml(TINY / "tiny.toml")
    build_config(CorpusConfig, toml, "corpus")
    build_config(CrawlFilterConfig, toml, "crawl-filter")
    build_config(DedupConfig, toml, "dedup")
    tok = build_config(TokenizeConfig, toml, "tokenize")
    pre = build_config(
        PretrainConfig, toml, "pretrain", data=("out/tokens-web=0.3", "out/tokens-code=0.7")
    )
    build_config(GenerateConfig, toml, "generate")
    sft = build_config(SFTConfig, toml, "sft", data="out/chat", init="out/base")
    assert sft.seq_len <= pre.seq_len  # the base model's context
    build_config(RMConfig, toml, "rm", data="out/prefs", init="out/sft")
    build_config(DPOConfig, toml, "dpo", data="out/prefs", init="out/sft")
    build_config(
        PPOConfig, toml, "ppo", prompts="out/prompts", init="out/sft", reward_model="out/rm"
    )
    p = plan(pre, tok.vocab_size)
    assert p["steps"] == pre.max_steps
    assert p["grad_accum"] >= 1
    # The demo must stay small: about a million training tokens.
    assert p["tokens"] <= 2_000_000


def test_tiny_makefile_plan(tmp_path: Path) -> None:
    r = subprocess.run(
        ["make", "-n", "-C", str(TINY), "LLMCTL=llmctl", f"OUT={tmp_path}/out"],
        capture_output=True,
        text=True,
        check=True,
    )
    stages = [ln.split()[3] for ln in r.stdout.splitlines() if ln.startswith("llmctl --seed")]
    assert stages == [
        *(
            "corpus",
            "crawl-filter",
            "dedup",
            "corpus",
            "tokenize",
            "tokenize",
            "pretrain",
            "generate",
        ),
        *("corpus", "sft", "corpus", "rm", "corpus", "ppo", "generate"),
        *("eval", "eval", "report"),
    ]
