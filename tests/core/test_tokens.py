"""Tests for llmctl.core.tokens: Megatron indexed-dataset files, written by us, read by us and by
Megatron-LM itself."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from llmctl.core.errors import InputError
from llmctl.core.tokens import MAGIC, IndexedDataset, IndexedWriter, token_dtype


def _docs(vocab: int, n: int = 50, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]
    docs.insert(3, np.zeros(0, dtype=np.int64))  # an empty document is legal
    docs.append(np.array([vocab - 1, 0, vocab - 1]))  # the extreme ids survive
    return docs


def _write(prefix: Path, docs: list[np.ndarray], vocab: int) -> None:
    w = IndexedWriter(prefix, token_dtype(vocab))
    for d in docs:
        w.add(d)
    w.close()


@pytest.mark.parametrize("vocab", [512, 65499, 65500, 200_000])
def test_round_trip(tmp_path: Path, vocab: int) -> None:
    prefix = tmp_path / "train"
    docs = _docs(vocab)
    _write(prefix, docs, vocab)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.n_tokens == sum(d.size for d in docs)
    assert ds.dtype == token_dtype(vocab)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d), i
    assert ds.doc_index.tolist() == list(range(len(docs) + 1))
    assert not Path(f"{prefix}.lens.tmp").exists()  # the side file is cleaned up


def test_dtype_choice() -> None:
    assert token_dtype(512) == np.uint16
    assert token_dtype(65499) == np.uint16  # Megatron's rule: < 65500
    assert token_dtype(65500) == np.int32
    assert token_dtype(1 << 20) == np.int32


@pytest.mark.parametrize(("vocab", "itemsize", "code"), [(32000, 2, 8), (100_000, 4, 4)])
def test_file_layout(tmp_path: Path, vocab: int, itemsize: int, code: int) -> None:
    prefix = tmp_path / "t"
    docs = [np.array([1, 2, 3]), np.array([4, 5])]
    _write(prefix, docs, vocab)
    assert Path(f"{prefix}.bin").stat().st_size == 5 * itemsize
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == MAGIC
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, code, 2, 3)
    assert np.frombuffer(raw, np.int32, 2, 34).tolist() == [3, 2]
    assert np.frombuffer(raw, np.int64, 2, 42).tolist() == [0, 3 * itemsize]
    assert np.frombuffer(raw, np.int64, 3, 58).tolist() == [0, 1, 2]
    assert len(raw) == 58 + 3 * 8


@pytest.mark.parametrize("vocab", [32000, 100_000])
def test_megatron_reads_our_files(tmp_path: Path, vocab: int) -> None:
    pytest.importorskip("megatron.core")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset

    prefix = tmp_path / "train"
    docs = _docs(vocab, n=30)
    _write(prefix, docs, vocab)
    theirs = MegatronDataset(str(prefix))
    ours = IndexedDataset(prefix)
    assert len(theirs) == len(docs)
    assert theirs.index.dtype == token_dtype(vocab)
    assert np.array_equal(theirs.document_indices, ours.doc_index)
    assert np.array_equal(theirs.sequence_lengths, [d.size for d in docs])
    for i, d in enumerate(docs):
        assert np.array_equal(theirs[i], d), i


@pytest.mark.parametrize("vocab", [32000, 100_000])
def test_byte_identical_to_megatron_builder(tmp_path: Path, vocab: int) -> None:
    pytest.importorskip("megatron.core")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = _docs(vocab, n=30)
    _write(tmp_path / "ours", docs, vocab)
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=token_dtype(vocab).type)
    for d in docs:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_empty_dataset(tmp_path: Path) -> None:
    prefix = tmp_path / "empty"
    _write(prefix, [], 512)
    ds = IndexedDataset(prefix)
    assert len(ds) == 0
    assert ds.n_tokens == 0
    assert ds.doc_index.tolist() == [0]


@pytest.mark.parametrize("cut", [0, 5, 33, 40, -1])
def test_truncated_idx(tmp_path: Path, cut: int) -> None:
    prefix = tmp_path / "t"
    _write(prefix, _docs(512), 512)
    idx = Path(f"{prefix}.idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:cut])
    with pytest.raises(InputError, match=r"t\.idx"):
        IndexedDataset(prefix)


@pytest.mark.parametrize("cut", [0, 1, -2])
def test_truncated_bin(tmp_path: Path, cut: int) -> None:
    prefix = tmp_path / "t"
    _write(prefix, _docs(512), 512)
    binp = Path(f"{prefix}.bin")
    binp.write_bytes(binp.read_bytes()[:cut])
    with pytest.raises(InputError, match=r"t\.bin holds \d+ bytes, its index says \d+"):
        IndexedDataset(prefix)


def test_bad_magic_and_missing_files(tmp_path: Path) -> None:
    prefix = tmp_path / "t"
    _write(prefix, _docs(512), 512)
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(b"NOTMEGATRON" + idx.read_bytes()[11:])
    with pytest.raises(InputError, match="is not a Megatron indexed-dataset index"):
        IndexedDataset(prefix)
    with pytest.raises(InputError, match=r"missing token file .*other\.idx"):
        IndexedDataset(tmp_path / "other")


def test_unknown_dtype_code(tmp_path: Path) -> None:
    prefix = tmp_path / "t"
    _write(prefix, _docs(512), 512)
    idx = Path(f"{prefix}.idx")
    raw = bytearray(idx.read_bytes())
    raw[17] = 99
    idx.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="dtype code 99"):
        IndexedDataset(prefix)
