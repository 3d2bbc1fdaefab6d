"""Shared by test_rm.py and test_dpo.py: a tiny base checkpoint and a learnable synthetic preference
(the chosen answer holds the marker word "kindly" where the rejected one, of the same length, holds
an ordinary word)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from llmctl.core.checkpoint import save_checkpoint
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import Tokenizer

WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "quick",
    "slow",
    "river",
    "stone",
    "cloud",
    "paper",
    "light",
    "tree",
]
MARKER = "kindly"


def base_checkpoint(path: Path, tokens_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer model (d_model 32, context 64) with the test tokenizer."""
    tok = Tokenizer.load(tokens_dir)
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=64,
    )
    return save_checkpoint(path, Transformer(cfg), tok)


def marker_pairs(path: Path, n: int = 200, seed: int = 0) -> Path:
    """n pairs as JSONL: the same random words in both answers, plus the marker (chosen) or another
    word (rejected) at the same random place."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(5)]
            at = rng.randrange(len(words) + 1)
            chosen, rejected = list(words), list(words)
            chosen.insert(at, MARKER)
            rejected.insert(at, rng.choice(WORDS))
            row = {
                "prompt": f"describe thing {i}",
                "chosen": " ".join(chosen),
                "rejected": " ".join(rejected),
            }
            f.write(json.dumps(row) + "\n")
    return path
