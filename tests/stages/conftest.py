"""Fixtures for stage tests: a small docs corpus, a tokens artifact, a 2-layer model config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmctl.stages import corpus, tokenize
from llmctl.stages.pretrain import PretrainConfig

# 2 layers, d_model 32: a few ms per step on a laptop CPU.
TINY_MODEL = {
    "model": "tiny",
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_ff": 64,
    "seq_len": 32,
    "batch_tokens": 256,
    "micro_batch": 4,
    "warmup_steps": 2,
    "eval_every": 0,
    "save_every": 0,
    "precision": "fp32",
    "device": "cpu",
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Stage tests train models a few dozen wide: threads buy nothing there, and on a shared 2-core
    machine OpenMP's spin-waiting workers make tiny ops many times slower. Module scope, so module
    fixtures that train run single-threaded too; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_pretrain(tokens: Path, **over: object) -> PretrainConfig:
    """A PretrainConfig for the 2-layer test model on `tokens`."""
    return PretrainConfig(**{"data": (str(tokens),), **TINY_MODEL, **over})


@pytest.fixture(name="tiny_pretrain", scope="session")
def tiny_pretrain_fixture():  # noqa: ANN201
    """The `tiny_pretrain` factory, for tests."""
    return tiny_pretrain


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 stdlib documents as a docs artifact."""
    out = tmp_path_factory.mktemp("docs") / "docs"
    corpus.run(out, corpus.CorpusConfig(max_docs=120))
    return out


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory: pytest.TempPathFactory, docs_dir: Path) -> Path:
    """The same documents as JSONL with the text under `body`."""
    from llmctl.core.docs import open_docs

    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t in open_docs(docs_dir).texts():
            f.write(json.dumps({"body": t, "url": "x"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory, docs_dir: Path) -> Path:
    """Tokens artifact with a 512-id tokenizer and a 10% validation split."""
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    tokenize.run(
        docs_dir, out, tokenize.TokenizeConfig(vocab_size=512, val_fraction=0.1, workers=1)
    )
    return out


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> Path:
    """A briefly pretrained 2-layer checkpoint (context 64) to post-train from."""
    from llmctl.stages import pretrain

    out = tmp_path_factory.mktemp("base") / "base"
    pretrain.run(
        out, tiny_pretrain(tokens_dir, seq_len=64, batch_tokens=512, micro_batch=8, max_steps=20)
    )
    return out
