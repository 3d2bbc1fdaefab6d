"""Shared fixtures for the core tests: tiny tokenizers (trained once per session) and tiny models."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import Tokenizer, train_tokenizer

# A few stdlib modules give a few thousand lines of real code and prose, identical on every machine
# that runs this Python version, with no download.
_STDLIB_FILES = ("textwrap.py", "string.py", "functools.py", "shlex.py")
_EXTRA_LINES = [
    "Der Bär läuft über die Straße, naïve café, résumé.",
    "日本語のテキストと中文文本。",
    "مرحبا بالعالم",
    "Ελληνικά κείμενα και русский текст.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded: these tensors are tiny, so intra-op threads buy nothing, and
    OpenMP's spinning workers slow tiny ops down many times over when CPU cores are shared (CI).
    Module scope, so the setting is restored before tests outside tests/core run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    """Non-empty lines of stdlib source plus some non-Latin text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in _STDLIB_FILES:
        lines += [ln for ln in (root / name).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines + _EXTRA_LINES * 2


@pytest.fixture(scope="session")
def tokenizer(corpus_lines: list[str]) -> Tokenizer:
    """A 512-id BPE tokenizer: 8 specials, 256 byte tokens, the rest characters and merges."""
    return Tokenizer.from_bytes(train_tokenizer(corpus_lines, 512))


@pytest.fixture(scope="session")
def other_tokenizer(corpus_lines: list[str]) -> Tokenizer:
    """Same vocabulary size, different training text: a different fingerprint."""
    return Tokenizer.from_bytes(train_tokenizer(corpus_lines[::-1][:1000], 512))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """2 layers, d_model 32, GQA 4/2, vocab 256, context 64."""
    return ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64
    )


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """Factory: a seeded, eval-mode fp32 Transformer for a config."""

    def make(cfg: ModelConfig, seed: int = 0) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(cfg).eval()

    return make
