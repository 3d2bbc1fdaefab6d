"""tokenize: counts, Megatron files, determinism across worker counts, reuse, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from llmctl.core.artifacts import Manifest
from llmctl.core.docs import open_docs
from llmctl.core.errors import InputError
from llmctl.core.tokenizer import Tokenizer
from llmctl.core.tokens import IndexedDataset
from llmctl.stages import tokenize


def test_tokens_artifact_is_complete_and_decodes_back(tokens_dir: Path, docs_dir: Path) -> None:
    m = Manifest.read(tokens_dir)
    assert m.kind == "tokens"
    c = m.counts
    assert c["train_documents"] + c["val_documents"] == c["documents"] == 120
    assert c["val_documents"] > 0
    train, val = IndexedDataset(tokens_dir / "train"), IndexedDataset(tokens_dir / "val")
    assert train.n_tokens + val.n_tokens == c["tokens"]
    assert train.dtype == np.uint16
    tok = Tokenizer.load(tokens_dir)
    assert m.tokenizer["fingerprint"] == tok.fingerprint
    texts = list(open_docs(docs_dir).texts())
    # Every document is BOS ... EOS, and the source documents are exactly the two splits merged
    # in order (each source document is the next train document or the next val document).
    assert all(train[i][0] == tok.bos_id and train[i][-1] == tok.eos_id for i in range(len(train)))
    splits = {
        "train": [tok.decode(train[i]) for i in range(len(train))],
        "val": [tok.decode(val[i]) for i in range(len(val))],
    }
    pos = {"train": 0, "val": 0}
    for t in texts:
        name = next(
            n for n in ("train", "val") if pos[n] < len(splits[n]) and splits[n][pos[n]] == t
        )
        pos[name] += 1
    assert pos == {"train": len(train), "val": len(val)}
    assert 1.5 < m.stats["bytes_per_token"] < 6
    assert m.stats["unigram_loss_val"] > 0
    assert c["bytes"] == sum(len(t.encode()) for t in texts)


def test_output_is_identical_for_any_worker_count(
    tmp_path: Path, docs_dir: Path, tokens_dir: Path
) -> None:
    cfg = tokenize.TokenizeConfig(tokenizer=str(tokens_dir), val_fraction=0.1, workers=2)
    tokenize.run(docs_dir, tmp_path / "t2", cfg)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx", "tokenizer.model"):
        assert (tmp_path / "t2" / name).read_bytes() == (tokens_dir / name).read_bytes(), name


def test_jsonl_gz_with_other_text_column(
    tmp_path: Path, docs_jsonl: Path, tokens_dir: Path
) -> None:
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(docs_jsonl.read_bytes()))
    m = tokenize.run(
        gz,
        tmp_path / "t",
        tokenize.TokenizeConfig(tokenizer=str(tokens_dir), text_column="body", workers=1),
    )
    assert m.counts["documents"] == 120
    assert m.tokenizer["reused"] is True


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "contains no documents"),
        (b'{"body": "x"}\n', "has no column 'text' (found: body)"),
        (b'{"text": "caf\xe9"}\n', "is not valid UTF-8"),
        (b'{"text": "ok"}\n{"text": \n', "is not valid JSON"),
    ],
)
def test_bad_input_fails_cleanly(
    tmp_path: Path, tokens_dir: Path, content: bytes, message: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    dst = tmp_path / "out"
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tokenize.run(src, dst, tokenize.TokenizeConfig(tokenizer=str(tokens_dir), workers=1))
    assert not dst.exists()
    assert not (tmp_path / "out.partial").exists()


def test_replace_reads_non_utf8(tmp_path: Path, tokens_dir: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 au lait"}\n' * 3)
    m = tokenize.run(
        src,
        tmp_path / "o",
        tokenize.TokenizeConfig(
            tokenizer=str(tokens_dir), encoding_errors="replace", val_fraction=0, workers=1
        ),
    )
    assert m.counts["documents"] == 3
    tok = Tokenizer.load(tmp_path / "o")
    assert tok.decode(IndexedDataset(tmp_path / "o" / "train")[0]) == "caf\ufffd au lait"


def test_existing_output_is_kept_without_force(
    tmp_path: Path, tokens_dir: Path, docs_dir: Path
) -> None:
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        tokenize.run(docs_dir, dst, tokenize.TokenizeConfig(tokenizer=str(tokens_dir), workers=1))
    assert (dst / "keep.txt").read_text() == "mine"


def test_megatron_reads_our_split(tokens_dir: Path) -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed

    ours, theirs = IndexedDataset(tokens_dir / "val"), MegatronIndexed(str(tokens_dir / "val"))
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        assert np.array_equal(theirs[i], ours[i])


def test_manifest_records_resolved_config(tokens_dir: Path) -> None:
    m = json.loads((tokens_dir / "manifest.json").read_text())
    assert m["config"]["vocab_size"] == 512
    assert m["config"]["val_fraction"] == 0.1
    assert m["inputs"][0]["fingerprint"]
    assert m["stage"] == "tokenize"
    assert m["format_version"] == 1
