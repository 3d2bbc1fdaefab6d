"""Reading and writing `docs` datasets: the text artifacts that data stages exchange.

A docs artifact is a directory of zstd Parquet shards (`part-00000.parquet`, ...) with a `text`
column plus metadata columns, and a `manifest.json`. Readers also take, without a manifest: single
Parquet files, JSONL (optionally .gz or .zst), plain .txt files (one document per file), a
directory holding any of those, and `-`: an Arrow IPC stream on stdin. Everything streams in record
batches, so no stage holds a corpus in memory. The text column is renamed to `text` on the way in.

Inside an artifact directory only the top-level files are documents: subdirectories hold side
datasets (a `duplicates/` or `rejected/` report) that are not read as documents. A plain directory
without a manifest is searched recursively.

For `--shard K/N`, an input splits into units (`DocSource.units`): one per Parquet row group, one per
JSONL or .txt file, one for stdin. Unit number i, counted in input order, belongs to shard i mod N.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmctl.core.artifacts import MANIFEST, Manifest, input_record, is_artifact
from llmctl.core.errors import InputError

BATCH_ROWS = 1024
EncodingErrors = Literal["strict", "replace"]
_DOC_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".txt")


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in (".jsonl.gz", ".jsonl.zst"):
        if name.endswith(s):
            return s
    return p.suffix.lower()


class Unit(NamedTuple):
    """The smallest piece of an input that `--shard K/N` hands out whole."""

    file: int  # index into DocSource.files (0 for stdin)
    row_group: int | None  # Parquet row group; None for a whole JSONL/.txt file or stdin
    first_row: int  # row number, within its file, of the unit's first document
    rows: int | None  # documents in it, when known without reading (Parquet)


@dataclass
class DocSource:
    """An opened input: where its documents come from and how to stream them.

    Attributes:
        path: What the user passed.
        files: The files to read, in order (empty for stdin).
        text_column: Column that holds the text in the input.
        encoding_errors: "strict" rejects non-UTF-8 bytes; "replace" substitutes U+FFFD.
        manifest: The input's manifest, when it is an llmctl artifact.
    """

    path: str
    files: list[Path] = field(default_factory=list)
    text_column: str = "text"
    encoding_errors: EncodingErrors = "strict"
    manifest: Manifest | None = None

    def record(self) -> dict[str, Any]:
        """This input as recorded in a manifest (path, kind, fingerprint)."""
        return input_record(self.path, "docs")

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches with a `text` column (string) and, unless `columns` limits it,
        the other columns.

        Raises:
            InputError: Missing text column, unreadable file, non-UTF-8 text, empty input.
        """
        n = 0
        for batch in self._raw_batches(columns):
            batch = self._normalise(batch)
            n += batch.num_rows
            if batch.num_rows:
                yield batch
        if n == 0:
            raise InputError(
                f"{self.path} contains no documents", "check the input path and filters"
            )

    def units(self) -> list[Unit]:
        """The input's units in input order (reads only Parquet footers).

        Raises:
            InputError: An unreadable Parquet file, or one without the text column.
        """
        if self.path == "-":
            return [Unit(0, None, 0, None)]
        out = []
        for i, f in enumerate(self.files):
            if _suffix(f) != ".parquet":
                out.append(Unit(i, None, 0, None))
                continue
            meta = self._parquet_file(f).metadata
            first = 0
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                out.append(Unit(i, rg, first, rows))
                first += rows
        return out

    def unit_batches(
        self, unit: Unit, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Stream the record batches of one unit, as `batches` does; an empty unit yields nothing.

        Raises:
            InputError: Missing text column, unreadable file, non-UTF-8 text.
        """
        if self.path == "-":
            raw = self._stdin_batches()
        elif unit.row_group is not None:
            raw = self._parquet_batches(self.files[unit.file], columns, [unit.row_group])
        else:
            raw = self._file_batches(self.files[unit.file], columns)
        for batch in raw:
            batch = self._normalise(batch)
            if batch.num_rows:
                yield batch

    def spool(self, path: Path) -> DocSource:
        """Copy this input (read once, e.g. stdin) to a zstd Parquet file at `path` and return a
        source over that file, for stages that read their input twice."""
        writer = None
        for batch in self.batches():
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema, compression="zstd")
            writer.write_batch(batch)
        if writer is not None:
            writer.close()
        return DocSource(str(path), [path], "text", self.encoding_errors)

    def texts(self) -> Iterator[str]:
        """Stream the non-empty texts only."""
        for batch in self.batches(columns=["text"]):
            for t in batch.column("text").to_pylist():
                if t:
                    yield t

    # -- internals -------------------------------------------------------------------------

    def _raw_batches(self, columns: list[str] | None) -> Iterator[tuple[pa.RecordBatch, str]]:
        if self.path == "-":
            yield from self._stdin_batches()
            return
        for f in self.files:
            yield from self._file_batches(f, columns)

    def _file_batches(self, f: Path, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        s = _suffix(f)
        if s == ".parquet":
            yield from self._parquet_batches(f, columns)
        elif s in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"):
            yield from self._jsonl_batches(f)
        else:
            yield from self._txt_batches(f)

    def _check_column(self, names: list[str], where: str) -> None:
        if self.text_column not in names:
            alt = next((c for c in names if c != self.text_column), None)
            hint = f"pass --text-column {alt}" if alt else "the input needs a text column"
            raise InputError(
                f"{where} has no column '{self.text_column}' (found: {', '.join(names) or 'none'})",
                hint,
            )

    def _stdin_batches(self) -> Iterator[pa.RecordBatch]:
        try:
            reader = pa.ipc.open_stream(sys.stdin.buffer)
        except pa.ArrowInvalid as e:
            raise InputError(
                f"stdin is not an Arrow IPC stream ({e})",
                "pipe the output of an llmctl stage run with -o -",
            ) from None
        self._check_column(reader.schema.names, "stdin")
        yield from reader

    def _parquet_file(self, f: Path) -> pq.ParquetFile:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{f} is not a readable Parquet file ({e})", "re-create it") from None
        self._check_column(pf.schema_arrow.names, str(f))
        return pf

    def _parquet_batches(
        self, f: Path, columns: list[str] | None, row_groups: list[int] | None = None
    ) -> Iterator[pa.RecordBatch]:
        pf = self._parquet_file(f)
        cols = None
        if columns is not None:
            cols = [self.text_column if c == "text" else c for c in columns]
        try:
            yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=row_groups, columns=cols)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{f} is corrupt ({e})", "re-create it") from None

    def _open_text(self, f: Path) -> BinaryIO:
        s = _suffix(f)
        if s == ".jsonl.gz":
            return gzip.open(f, "rb")  # type: ignore[return-value]
        if s == ".jsonl.zst":
            return _ZstdFile(f)  # type: ignore[return-value]
        return open(f, "rb")

    def _jsonl_batches(self, f: Path) -> Iterator[pa.RecordBatch]:
        rows: list[dict[str, Any]] = []
        try:
            with self._open_text(f) as raw:
                for lineno, line in enumerate(io.BufferedReader(raw), 1):  # type: ignore[arg-type]
                    if not line.strip():
                        continue
                    text = self._decode(line, f"{f} line {lineno}")
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as e:
                        raise InputError(
                            f"{f} line {lineno} is not valid JSON ({e.msg})",
                            "fix or drop that line",
                        ) from None
                    if not isinstance(row, dict):
                        raise InputError(f"{f} line {lineno} is not a JSON object")
                    if self.text_column not in row:
                        self._check_column(list(row), f"{f} line {lineno}")
                    rows.append(row)
                    if len(rows) >= BATCH_ROWS:
                        yield _rows_to_batch(rows, f)
                        rows = []
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise InputError(
                f"{f} is truncated or corrupt ({e})", "re-fetch or re-create it"
            ) from None
        except Exception as e:
            if type(e).__module__.startswith("zstandard"):
                raise InputError(f"{f} is not a valid zstd file ({e})", "re-create it") from None
            raise
        if rows:
            yield _rows_to_batch(rows, f)

    def _txt_batches(self, f: Path) -> Iterator[pa.RecordBatch]:
        text = self._decode(f.read_bytes(), str(f))
        yield pa.RecordBatch.from_pydict({self.text_column: [text], "path": [str(f)]})

    def _decode(self, data: bytes, where: str) -> str:
        try:
            return data.decode("utf-8", errors=self.encoding_errors)
        except UnicodeDecodeError as e:
            raise InputError(
                f"{where} is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})",
                "convert it (iconv -f latin1 -t utf-8) or pass --encoding-errors replace",
            ) from None

    def _normalise(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        names = batch.schema.names
        i = names.index(self.text_column)
        col = batch.column(i)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            col = pa.array(
                [
                    None if b is None else self._decode(b, f"{self.path} column {self.text_column}")
                    for b in col.to_pylist()
                ],
                pa.string(),
            )
        elif pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
        elif not pa.types.is_string(col.type):
            raise InputError(
                f"{self.path}: column '{self.text_column}' holds {col.type}, not text",
                "pass --text-column with a string column",
            )
        if self.text_column != "text" and "text" in names:
            drop = names.index("text")
            batch = batch.remove_column(drop)
            names = batch.schema.names
            i = names.index(self.text_column)
        return batch.set_column(i, "text", col)


class _ZstdFile(io.RawIOBase):
    """Decompressed bytes of a .zst file (one or more frames) that raises EOFError when the file ends
    inside a frame. zstandard's `stream_reader` returns the frames' data up to the cut and then a
    clean EOF, so a truncated download would silently lose its tail; gzip raises, and so does this."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._in_frame = False  # the current frame has been fed bytes but has not ended
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:
        while self._pos == len(self._out):
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._dobj.decompress(chunk))
            if not self._dobj.eof:
                break
            # A frame ended inside this chunk; what follows it starts the next frame.
            chunk = self._dobj.unused_data
            self._dobj = self._dctx.decompressobj()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _rows_to_batch(rows: list[dict[str, Any]], f: Path) -> pa.RecordBatch:
    try:
        return pa.RecordBatch.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(
            f"{f}: rows have inconsistent types ({e})", "make each column one type"
        ) from None


def _collect_files(root: Path, recursive: bool = True) -> list[Path]:
    return sorted(
        p
        for p in (root.rglob("*") if recursive else root.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.name != MANIFEST
        and any(p.name.lower().endswith(s) for s in _DOC_SUFFIXES)
    )


def open_docs(
    path: str | Path, text_column: str = "text", encoding_errors: EncodingErrors = "strict"
) -> DocSource:
    """Open a docs input: artifact dir, Parquet/JSONL/txt file, a directory of them, or `-`.

    Raises:
        InputError: The path does not exist, is of another artifact kind, or holds no readable file.
    """
    if str(path) == "-":
        return DocSource("-", [], text_column, encoding_errors)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist", "check the input path")
    manifest = None
    if p.is_dir():
        if is_artifact(p):
            manifest = Manifest.read(p)
            if manifest.kind != "docs":
                raise InputError(
                    f"{p} is a {manifest.kind} artifact, not a docs dataset",
                    "pass the dataset directory this stage reads",
                )
        # An artifact's subdirectories hold side datasets (reports), not documents.
        files = _collect_files(p, recursive=manifest is None)
        if not files:
            raise InputError(
                f"{p} holds no Parquet, JSONL or .txt files",
                "point at a dataset directory or files",
            )
    else:
        files = [p]
    return DocSource(str(path), files, text_column, encoding_errors, manifest)


class DocWriter:
    """Write record batches as a docs dataset: zstd Parquet shards in a directory, or an Arrow IPC
    stream to a binary file object (stdout for `-o -`).

    Args:
        target: Directory for shards, or a binary stream.
        shard_rows: Rows per Parquet shard.
    """

    def __init__(self, target: Path | BinaryIO, shard_rows: int = 100_000) -> None:
        self.target = target
        self.shard_rows = shard_rows
        self.rows = 0
        self.bytes = 0
        self.shards = 0
        self._writer: pq.ParquetWriter | pa.ipc.RecordBatchStreamWriter | None = None
        self._schema: pa.Schema | None = None
        self._in_shard = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Append a batch (all batches must share one schema)."""
        if self._schema is None:
            self._schema = batch.schema
        elif batch.schema != self._schema:
            batch = pa.RecordBatch.from_pylist(batch.to_pylist(), schema=self._schema)
        self.rows += batch.num_rows
        self.bytes += int(pc.sum(pc.binary_length(batch.column("text"))).as_py() or 0)
        if not isinstance(self.target, Path):
            if self._writer is None:
                self._writer = pa.ipc.new_stream(self.target, self._schema)
            self._writer.write_batch(batch)
            return
        if self._writer is None or self._in_shard >= self.shard_rows:
            self._close_shard()
            path = self.target / f"part-{self.shards:05d}.parquet"
            self._writer = pq.ParquetWriter(path, self._schema, compression="zstd")
            self.shards += 1
        self._writer.write_batch(batch)
        self._in_shard += batch.num_rows

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._in_shard = 0

    def close(self) -> None:
        """Finish the last shard (or the stream)."""
        self._close_shard()
        if not isinstance(self.target, Path):
            self.target.flush()


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `--shard K/N` (0 <= K < N): this process takes the input units numbered K modulo N.

    Raises:
        ConfigError: Not of that form.
    """
    from llmctl.core.config import require
    from llmctl.core.errors import ConfigError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like K/N, e.g. 0/4, got {text!r}") from None
    require(n >= 1 and 0 <= k < n, f"--shard K/N needs 0 <= K < N, got {text}")
    return k, n
