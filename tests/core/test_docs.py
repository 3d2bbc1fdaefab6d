"""Tests for llmctl.core.docs: every input format, column handling, and named failures."""

from __future__ import annotations

import gzip
import io
import json
import random
import string
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llmctl.core.artifacts import Manifest
from llmctl.core.docs import DocWriter, open_docs
from llmctl.core.errors import InputError

TEXTS = ["first document", "zweites Dokument: Größe", "第三个文档 🙂", "line one\nline two\r\n"]


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _rows(column: str = "text") -> list[dict]:
    return [{column: t, "id": i} for i, t in enumerate(TEXTS)]


def _read_all(source) -> pa.Table:  # noqa: ANN001
    return pa.Table.from_batches(list(source.batches()))


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), path)
    return path


def test_parquet_file(parquet_file: Path) -> None:
    src = open_docs(parquet_file)
    table = _read_all(src)
    assert table.column("text").to_pylist() == TEXTS
    assert table.column("id").to_pylist() == [0, 1, 2, 3]
    assert list(src.texts()) == TEXTS
    assert src.manifest is None
    assert src.record()["fingerprint"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"])
def test_jsonl_files(tmp_path: Path, suffix: str) -> None:
    raw = _jsonl_bytes(_rows()) + b"\n   \n"  # blank lines are skipped
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl.gz":
        raw = gzip.compress(raw)
    elif suffix == ".jsonl.zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    table = _read_all(open_docs(path))
    assert table.column("text").to_pylist() == TEXTS
    assert table.column("id").to_pylist() == [0, 1, 2, 3]


def test_jsonl_many_batches(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(_jsonl_bytes([{"text": f"doc {i}"} for i in range(2500)]))
    batches = list(open_docs(path).batches())
    assert len(batches) == 3  # 1024 rows per batch
    assert [t for b in batches for t in b.column("text").to_pylist()] == [
        f"doc {i}" for i in range(2500)
    ]


def test_directory_of_txt_files(tmp_path: Path) -> None:
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(TEXTS[1], encoding="utf-8")
    (d / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (d / "sub" / "c.txt").write_text(TEXTS[2], encoding="utf-8")
    (d / ".hidden.txt").write_text("skip me", encoding="utf-8")
    (d / "notes.md").write_text("skip me too", encoding="utf-8")
    table = _read_all(open_docs(d))
    assert table.column("text").to_pylist() == TEXTS[:3]  # sorted by path, recursive
    assert [Path(p).name for p in table.column("path").to_pylist()] == ["a.txt", "b.txt", "c.txt"]


def test_mixed_directory(tmp_path: Path, parquet_file: Path) -> None:
    (tmp_path / "extra.jsonl").write_bytes(_jsonl_bytes([{"text": "from jsonl"}]))
    texts = list(open_docs(tmp_path).texts())
    assert sorted(texts) == sorted([*TEXTS, "from jsonl"])


def test_docs_artifact_dir(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    w = DocWriter(d, shard_rows=2)
    for r in _rows():
        w.write(pa.RecordBatch.from_pylist([r]))
    w.close()
    Manifest(kind="docs", stage="test").write(d)
    src = open_docs(d)
    assert src.manifest is not None
    assert src.manifest.kind == "docs"
    assert list(src.texts()) == TEXTS
    assert src.record()["kind"] == "docs"


def test_other_artifact_kind_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "tok"
    d.mkdir()
    (d / "x.txt").write_text("hi")
    Manifest(kind="tokens", stage="tokenize").write(d)
    with pytest.raises(InputError, match="is a tokens artifact, not a docs dataset"):
        open_docs(d)


def test_text_column_is_renamed(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(_rows("body")), path)
    table = _read_all(open_docs(path, text_column="body"))
    assert "body" not in table.column_names
    assert table.column("text").to_pylist() == TEXTS


def test_text_column_replaces_an_existing_text_column(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl_bytes([{"text": "old", "body": t} for t in TEXTS]))
    table = _read_all(open_docs(path, text_column="body"))
    assert table.column_names.count("text") == 1
    assert table.column("text").to_pylist() == TEXTS


def test_missing_column_names_the_found_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "x", "url": "u"}]), path)
    with pytest.raises(InputError, match=r"has no column 'text' \(found: body, url\)") as e:
        list(open_docs(path).batches())
    assert e.value.hint == "pass --text-column body"

    jl = tmp_path / "d.jsonl"
    jl.write_bytes(_jsonl_bytes([{"content": "x", "meta": 1}]))
    with pytest.raises(InputError, match=r"line 1 has no column 'text' \(found: content, meta\)"):
        list(open_docs(jl).batches())


def test_non_string_text_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(InputError, match="holds int64, not text"):
        list(open_docs(path).batches())


def test_binary_text_column_is_decoded(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": pa.array([t.encode() for t in TEXTS], pa.binary())}), path)
    assert list(open_docs(path).texts()) == TEXTS
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())}), bad)
    with pytest.raises(InputError, match="is not valid UTF-8"):
        list(open_docs(bad).batches())


def test_non_utf8_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        InputError, match=r"d\.jsonl line 2 is not valid UTF-8 \(byte 13: b'\\xe9'\)"
    ) as e:
        list(open_docs(path).batches())
    assert "--encoding-errors replace" in (e.value.hint or "")
    texts = list(open_docs(path, encoding_errors="replace").texts())
    assert texts == ["fine", "caf\ufffd"]


def test_non_utf8_txt(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Größe".encode("latin-1"))
    with pytest.raises(InputError, match="is not valid UTF-8"):
        list(open_docs(path).batches())
    assert list(open_docs(path, encoding_errors="replace").texts()) == ["Gr\ufffd\ufffde"]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.parquet", "blank.jsonl"])
def test_empty_input(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(b"" if name == "empty.jsonl" else b"\n\n  \n")
    with pytest.raises(InputError, match="contains no documents"):
        list(open_docs(path).batches())


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_docs(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no Parquet, JSONL or .txt files"):
        open_docs(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet(parquet_file: Path, damage: str) -> None:
    data = parquet_file.read_bytes()
    parquet_file.write_bytes(
        b"not parquet at all" if damage == "garbage" else data[: len(data) // 2]
    )
    with pytest.raises(InputError, match="is not a readable Parquet file"):
        list(open_docs(parquet_file).batches())


def test_corrupt_compressed_jsonl(tmp_path: Path) -> None:
    raw = _jsonl_bytes(_rows() * 50)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(InputError, match="is truncated or corrupt"):
        list(open_docs(gz).batches())
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    with pytest.raises(InputError, match=r"d\.jsonl\.zst"):
        list(open_docs(zst).batches())


def _aligned_lines(n: int) -> bytes:
    """n JSONL lines of exactly 128 bytes: zstd's 128 KiB blocks then end on line boundaries, so a
    file cut after a block decompresses to whole, valid lines."""
    rng = random.Random(0)
    width = 128 - len(json.dumps({"text": ""})) - 1
    return b"".join(
        json.dumps({"text": "".join(rng.choices(string.ascii_letters, k=width))}).encode() + b"\n"
        for _ in range(n)
    )


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_zst_is_not_read_silently(tmp_path: Path, keep: float) -> None:
    raw = _aligned_lines(3000)
    packed = zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(packed[: int(len(packed) * keep)])
    with pytest.raises(InputError, match=r"d\.jsonl\.zst is truncated or corrupt"):
        list(open_docs(path).batches())


def test_multi_frame_zst(tmp_path: Path) -> None:
    """Concatenated frames (pzstd, `cat a.zst b.zst`) are one stream; all are read."""
    raw = _aligned_lines(3000)
    c = zstandard.ZstdCompressor()
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(
        c.compress(raw[: 128 * 7])
        + c.compress(raw[128 * 7 : 128 * 1500])
        + c.compress(raw[128 * 1500 :])
    )
    assert sum(b.num_rows for b in open_docs(path).batches()) == 3000


def test_bad_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        list(open_docs(path).batches())
    path.write_bytes(b'{"text": "ok"}\n["a list"]\n')
    with pytest.raises(InputError, match="line 2 is not a JSON object"):
        list(open_docs(path).batches())


# -- writing ----------------------------------------------------------------------------------------


def test_doc_writer_shards_with_zstd(tmp_path: Path) -> None:
    rows = [{"text": f"document number {i}", "n": i} for i in range(7)]
    w = DocWriter(tmp_path, shard_rows=3)
    for r in rows:
        w.write(pa.RecordBatch.from_pylist([r]))
    w.close()
    shards = sorted(tmp_path.glob("part-*.parquet"))
    assert [s.name for s in shards] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [pq.ParquetFile(s).metadata.num_rows for s in shards] == [3, 3, 1]
    for s in shards:
        meta = pq.ParquetFile(s).metadata
        assert {meta.row_group(0).column(c).compression for c in range(meta.num_columns)} == {
            "ZSTD"
        }
    assert (w.rows, w.shards) == (7, 3)
    assert w.bytes == sum(len(r["text"].encode()) for r in rows)
    assert pq.read_table(tmp_path).to_pylist() == rows


def test_doc_writer_coerces_a_differing_schema(tmp_path: Path) -> None:
    w = DocWriter(tmp_path)
    w.write(pa.RecordBatch.from_pylist([{"text": "a", "n": 1}]))
    w.write(pa.RecordBatch.from_pylist([{"n": 2, "text": "b"}]))  # same columns, other order
    w.close()
    assert pq.read_table(tmp_path).to_pylist() == [{"text": "a", "n": 1}, {"text": "b", "n": 2}]


def test_arrow_stream_round_trip_through_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    w = DocWriter(buf)
    w.write(pa.RecordBatch.from_pylist(_rows()))
    w.close()

    class FakeStdin:
        buffer = io.BytesIO(buf.getvalue())

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    src = open_docs("-")
    assert list(src.texts()) == TEXTS
    assert src.record() == {"path": "-", "kind": "docs", "fingerprint": None}


def test_stdin_that_is_not_arrow(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStdin:
        buffer = io.BytesIO(b"plain text, not arrow")

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    with pytest.raises(InputError, match="stdin is not an Arrow IPC stream"):
        list(open_docs("-").batches())


def test_artifact_subdirectories_are_not_documents(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    (d / "duplicates").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_rows()), d / "part-00000.parquet")
    pq.write_table(pa.table({"text": ["a report row"]}), d / "duplicates" / "part-00000.parquet")
    assert len(open_docs(d).files) == 2  # no manifest: a plain directory, searched recursively
    Manifest(kind="docs", stage="test").write(d)
    src = open_docs(d)
    assert [f.name for f in src.files] == ["part-00000.parquet"]
    assert list(src.texts()) == TEXTS


def test_units_split_parquet_by_row_group(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(_rows()), tmp_path / "a.parquet", row_group_size=3)
    (tmp_path / "b.jsonl").write_bytes(_jsonl_bytes(_rows()))
    src = open_docs(tmp_path)
    units = src.units()
    assert [(u.file, u.row_group, u.first_row, u.rows) for u in units] == [
        (0, 0, 0, 3),
        (0, 1, 3, 1),
        (1, None, 0, None),
    ]
    texts = [t for u in units for b in src.unit_batches(u) for t in b.column("text").to_pylist()]
    assert texts == TEXTS + TEXTS
