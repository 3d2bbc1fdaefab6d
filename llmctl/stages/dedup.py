"""dedup: docs -> docs without exact duplicates and MinHash near-duplicates, in three steps that can
run on many machines.

Steps (each writes an artifact with a manifest):
    signatures  INPUT [--shard K/N] -> SIGS   per document: exact key and MinHash signature (Parquet)
    cluster     SIGS...             -> CLUSTERS  exact groups + LSH candidates verified by their
                                                  estimated Jaccard, joined by union-find
    write       INPUT --clusters CLUSTERS [--shard K/N] -> OUT   survivors + duplicates/ report
`run` (`llmctl dedup INPUT -o OUT`) does all three, its intermediate files in OUT.partial/.

Algorithm (hashing and banding in core/minhash.py): a document's text is normalised (NFKC,
lowercase, whitespace runs collapsed); equal normalised texts are exact duplicates. Near
duplicates: MinHash over word n-gram shingles (`ngram` 5, `num_perm` 128, datasketch's affine32
permutations), LSH with bands and rows derived from `threshold` (default 0.8: 14 bands of 9 rows),
each candidate pair kept only if its signatures estimate Jaccard >= threshold, clusters formed
transitively. Survivor rule: the first document of a cluster in input order (input files in sorted
order, then rows); every other member is removed, exact duplicates of a kept text included.

Document order and ids: a document is (file, row), its file's index in the sorted input and its row
within that file; this order does not depend on how the input was sharded. Its id is the input's
`id` column when present, else `<file relative to the input>:<row>` (`-:<row>` for stdin).

Sharding: the input splits into units (one per Parquet row group, one per JSONL/.txt file; see
core/docs.py); unit i belongs to shard i mod N. Signatures of N shards, clustered together, equal
those of one run, and so do the survivors of the N write shards.

Signature files (Parquet): file, row, id, exact (16 bytes) and minhash (4P bytes: P little-endian
uint32, `np.frombuffer(value, "<u4")` is datasketch's `hashvalues`).

Memory, with num_perm P = 128 and 10 million documents:
    signature files   4P + 16 (exact key) + 12 (file, row) + id bytes ~= 560 B/doc -> ~5.6 GB on disk
    signatures step   streaming: one record batch and its shingle hashes
    cluster step      2P (low 16 bits of each hash value, b-bit MinHash) + 16 (exact key)
                      + 8 (position) + 3 x 8 (rank, exact group, survivor) = 320 B/doc resident,
                      plus per band ~32 B/doc of keys and sort order and 16 B per candidate pair;
                      measured 342 B/doc of peak RSS (benchmarks/bench_dedup.py): ~3.3 GiB
    write step        streaming, plus the removed documents' positions (8 B each)

Output: a docs artifact with every input column (the text column named `text`), and inside it
`duplicates/part-00000.parquet`, one row per removed document: id, cluster (input-order index of
the cluster's survivor), kept_id, kind (exact: same normalised text as an earlier document; near:
MinHash match) and similarity (estimated Jaccard with the survivor). Docs readers skip an
artifact's subdirectories, so `duplicates/` is never read as documents. With `-o -` survivors go
to stdout as an Arrow stream and the report is not kept.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmctl.core import minhash
from llmctl.core.artifacts import Manifest, commit_output, input_record, is_artifact
from llmctl.core.config import require, to_dict
from llmctl.core.docs import DocSource, DocWriter, Unit, open_docs, parse_shard  # noqa: F401 - parse_shard re-exported
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.progress import SILENT, Progress

SIG_FILE_ROWS = 100_000  # rows per signatures Parquet file
ROW_BITS = 40  # position key = file << 40 | row: up to 2**24 files of 2**40 rows
SIG_CONFIG = ("num_perm", "ngram", "seed", "text_column", "encoding_errors")  # fixed by signatures


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """Settings of `llmctl dedup`."""

    threshold: float = 0.8  # estimated Jaccard at or above which two documents are near-duplicates
    num_perm: int = 128  # MinHash permutations (signature length)
    ngram: int = 5  # words per shingle
    fn_weight: float = 0.9  # weight of missed pairs (false positives: 1 - it) in choosing bands
    bands: int = 0  # LSH bands (0 = derived from threshold, num_perm and fn_weight)
    rows: int = 0  # signature positions per band (0 = derived)
    text_column: str = "text"  # column holding the text
    encoding_errors: Literal["strict", "replace"] = "strict"  # non-UTF-8 input: fail or replace
    seed: int = 0  # chooses the MinHash permutations (as datasketch's MinHash seed)

    def __post_init__(self) -> None:
        require(0 < self.threshold <= 1, f"--threshold must be in (0, 1], got {self.threshold}")
        require(8 <= self.num_perm <= 1024, f"--num-perm must be in [8, 1024], got {self.num_perm}")
        require(self.ngram >= 1, f"--ngram must be >= 1, got {self.ngram}")
        require(
            self.encoding_errors in ("strict", "replace"),
            f"--encoding-errors must be strict or replace, got {self.encoding_errors!r}",
        )
        require(0 < self.fn_weight < 1, f"fn_weight must be in (0, 1), got {self.fn_weight}")
        require(
            (self.bands == 0) == (self.rows == 0) and self.bands >= 0 and self.rows >= 0,
            f"bands and rows must both be 0 (derived) or both positive, got {self.bands}, {self.rows}",
        )
        require(
            self.bands * self.rows <= self.num_perm,
            f"bands x rows ({self.bands} x {self.rows}) exceeds --num-perm {self.num_perm}",
        )

    def lsh(self) -> tuple[int, int]:
        """(bands, rows): the configured ones, or those minimising the weighted error."""
        if self.bands:
            return self.bands, self.rows
        return minhash.optimal_bands(
            self.threshold, self.num_perm, 1 - self.fn_weight, self.fn_weight
        )


# -- the three steps --------------------------------------------------------------------------------


def signatures(
    src: str | Path,
    dst: Path,
    cfg: DedupConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Step 1: exact keys and MinHash signatures of one shard of the input, as a signatures artifact.

    Raises:
        InputError: Unreadable or empty input, missing text column.
        ConfigError: A bad shard, or a sharded stdin.
    """
    source = _open(src, cfg, shard)
    units = source.units()
    with commit_output(
        dst,
        kind="signatures",
        stage="dedup signatures",
        config=to_dict(cfg),
        inputs=[source.record()],
        force=force,
    ) as out:
        t0 = time.perf_counter()
        mine = units[shard[0] :: shard[1]]
        n = _write_signatures(source, _labels(source), mine, cfg, out.path, progress)
        if n == 0 and shard[1] == 1:
            raise InputError(f"{source.path} contains no documents", "check the input path")
        seconds = time.perf_counter() - t0
        out.manifest.counts = {"documents": n}
        out.manifest.stats = {
            "shard": f"{shard[0]}/{shard[1]}",
            "units": len(units),
            "shard_units": len(mine),
            "seconds": round(seconds, 3),
            "docs_per_s": round(n / max(seconds, 1e-9)),
        }
    return out.manifest


def cluster(
    sigs: list[Path],
    dst: Path,
    cfg: DedupConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Step 2: cluster the signatures of all shards into a clusters artifact (`duplicates.parquet`).

    The signature settings (num_perm, ngram, seed, text column) come from SIGS; `cfg` adds the
    threshold and LSH parameters.

    Raises:
        InputError: A path that is not a signatures artifact, or shards that do not fit together.
    """
    manifests = _check_signatures(sigs)
    first = manifests[0]
    cfg = dataclasses.replace(cfg, **{k: first.config[k] for k in SIG_CONFIG})
    with commit_output(
        dst,
        kind="clusters",
        stage="dedup cluster",
        config=to_dict(cfg),
        inputs=[input_record(p) for p in sigs],
        force=force,
    ) as out:
        files = [f for p in sigs for f in sorted(Path(p).glob("part-*.parquet"))]
        counts, stats = _cluster_files(files, cfg, out.path / "duplicates.parquet", progress)
        out.manifest.counts = counts
        out.manifest.stats = stats
        out.manifest.extra["source"] = first.inputs[0] if first.inputs else None
        out.manifest.extra["units"] = first.stats["units"]
    return out.manifest


def write(
    src: str | Path,
    clusters: Path,
    dst: str | Path,
    cfg: DedupConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: Progress = SILENT,
    stdout: BinaryIO | None = None,
) -> Manifest:
    """Step 3: write the survivors of one shard of the input, and its part of the duplicates report.

    Returns:
        The manifest (only in memory when `dst` is "-": a stream has none).

    Raises:
        InputError: CLUSTERS is not a clusters artifact, or was computed from another input.
    """
    if not is_artifact(Path(clusters), "clusters"):
        raise InputError(
            f"{clusters} is not a dedup clusters artifact",
            "make one with: llmctl dedup cluster SIGS... -o CLUSTERS",
        )
    cm = Manifest.read(Path(clusters))
    cfg = dataclasses.replace(cfg, **{k: cm.config[k] for k in SIG_CONFIG})
    source = _open(src, cfg, shard)
    record = source.record()
    units = source.units()
    expected = cm.extra.get("source") or {}
    if (expected.get("fingerprint") and record["fingerprint"]) and (
        expected["fingerprint"] != record["fingerprint"] or len(units) != cm.extra.get("units")
    ):
        raise InputError(
            f"{clusters} was computed from {expected.get('path')}, not from {src}",
            "pass the same INPUT to `dedup signatures` and `dedup write`",
        )
    mine = units[shard[0] :: shard[1]]
    dup_path = Path(clusters) / "duplicates.parquet"

    def body(writer: DocWriter, report: Path | None) -> dict[str, Any]:
        return _write_survivors(source, mine, dup_path, writer, report, progress)

    stats = {**cm.stats, "shard": f"{shard[0]}/{shard[1]}"}
    return _commit_docs(
        dst, "dedup write", cfg, [record, input_record(clusters)], stats, body, force, stdout
    )


def run(
    src: str | Path,
    dst: str | Path,
    cfg: DedupConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
    stdout: BinaryIO | None = None,
) -> Manifest:
    """All three steps on one machine: INPUT -> docs artifact at `dst` (or an Arrow stream for "-").

    Raises:
        InputError: Unreadable or empty input, missing text column.
    """
    source = _open(src, cfg, (0, 1))
    labels = _labels(source)
    record = source.record()
    timing: dict[str, float] = {}

    def body(writer: DocWriter, report: Path | None) -> dict[str, Any]:
        # Intermediate files go beside the output (same disk, removed on failure with it); a
        # stream has no output directory, so the system temp dir holds them.
        where = report.parent if report is not None else None
        with tempfile.TemporaryDirectory(prefix=".dedup-work-", dir=where) as tmp:
            work = Path(tmp)
            src_ = source
            if source.path == "-":  # read twice (signatures, then write): spool it
                src_ = source.spool(work / "stdin.parquet")
            units = src_.units()
            t0 = time.perf_counter()
            (work / "sigs").mkdir()
            n = _write_signatures(src_, labels, units, cfg, work / "sigs", progress)
            if n == 0:
                raise InputError(f"{source.path} contains no documents", "check the input path")
            t1 = time.perf_counter()
            files = sorted((work / "sigs").glob("part-*.parquet"))
            counts, stats = _cluster_files(files, cfg, work / "duplicates.parquet", progress)
            t2 = time.perf_counter()
            wcounts = _write_survivors(
                src_, units, work / "duplicates.parquet", writer, report, progress
            )
            t3 = time.perf_counter()
        timing.update(signatures=t1 - t0, cluster=t2 - t1, write=t3 - t2, total=t3 - t0)
        stats |= {f"seconds_{k}": round(v, 3) for k, v in timing.items()}
        stats["docs_per_s"] = round(n / max(timing["total"], 1e-9))
        stats["signature_docs_per_s"] = round(n / max(timing["signatures"], 1e-9))
        if wcounts["written"] != counts["kept"]:  # the write step must agree with the clusters
            raise RuntimeError(f"wrote {wcounts['written']} documents, expected {counts['kept']}")
        return {"counts": counts, "stats": stats}

    return _commit_docs(dst, "dedup", cfg, [record], {}, body, force, stdout)


# -- helpers ---------------------------------------------------------------------------------------


def _open(src: str | Path, cfg: DedupConfig, shard: tuple[int, int]) -> DocSource:
    if str(src) == "-" and shard[1] > 1:
        raise ConfigError("stdin cannot be sharded", "write it to a file first, or drop --shard")
    return open_docs(src, cfg.text_column, cfg.encoding_errors)


def _labels(source: DocSource) -> list[str]:
    """Per input file, the prefix of generated ids: its path relative to the input."""
    if source.path == "-":
        return ["-"]
    root = Path(source.path)
    if root.is_dir():
        return [f.relative_to(root).as_posix() for f in source.files]
    return [f.name for f in source.files]


def _unit_rows(
    source: DocSource, unit: Unit, columns: list[str] | None
) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """A unit's batches with each row's position key (file << ROW_BITS | row)."""
    row = unit.first_row
    for batch in source.unit_batches(unit, columns):
        rows = np.arange(row, row + batch.num_rows, dtype=np.uint64)
        row += batch.num_rows
        yield batch, (np.uint64(unit.file) << np.uint64(ROW_BITS)) | rows


def _pos(file: pa.ChunkedArray, row: pa.ChunkedArray) -> np.ndarray:
    """Position keys from file and row columns."""
    f = file.to_numpy().astype(np.uint64)
    return (f << np.uint64(ROW_BITS)) | row.to_numpy().astype(np.uint64)


def _id_columns(source: DocSource, unit: Unit) -> list[str]:
    if unit.row_group is None:
        return ["text"]  # JSONL/txt are read whole anyway
    names = pq.read_schema(source.files[unit.file]).names
    return ["text", "id"] if "id" in names else ["text"]


def _sig_schema(num_perm: int) -> pa.Schema:
    return pa.schema(
        [
            ("file", pa.int32()),
            ("row", pa.int64()),
            ("id", pa.string()),
            ("exact", pa.binary(16)),
            # num_perm little-endian uint32: np.frombuffer(value, "<u4") is datasketch's
            # MinHash(num_perm, seed).hashvalues (a fixed-size list is 10x slower in Parquet).
            ("minhash", pa.binary(4 * num_perm)),
        ]
    )


def _fixed_binary(values: np.ndarray, width: int) -> pa.Array:
    """A fixed_size_binary(width) array whose rows are the rows of `values` as bytes."""
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(values), [None, pa.py_buffer(np.ascontiguousarray(values).tobytes())]
    )


def _fixed_values(col: pa.Array, dtype: Any, per_row: int) -> np.ndarray:
    """The rows of a fixed_size_binary column as a (rows, per_row) numpy view."""
    flat = np.frombuffer(col.buffers()[1], dtype=dtype)
    return flat[col.offset * per_row : (col.offset + len(col)) * per_row].reshape(-1, per_row)


def _write_signatures(
    source: DocSource,
    labels: list[str],
    units: list[Unit],
    cfg: DedupConfig,
    out: Path,
    progress: Progress,
) -> int:
    """Write the signatures of `units` as part-NNNNN.parquet files in `out`; return the count."""
    perms = minhash.permutations(cfg.num_perm, cfg.seed)
    schema = _sig_schema(cfg.num_perm)
    known = [u.rows for u in units]
    progress.start("minhash signatures", sum(known) if None not in known else None, "docs")
    writer, in_file, n_files, n = None, 0, 0, 0
    columns: dict[int, list[str]] = {}
    for unit in units:
        if unit.file not in columns:
            columns[unit.file] = _id_columns(source, unit)
        for batch, pos in _unit_rows(source, unit, columns[unit.file]):
            hashed = minhash.hash_texts(batch.column("text"), cfg.ngram)
            sig = minhash.signatures(hashed.shingles, hashed.offsets, perms)
            rows = (pos & np.uint64((1 << ROW_BITS) - 1)).astype(np.int64)
            ids = _ids(batch, labels[unit.file], rows)
            table = pa.Table.from_arrays(
                [
                    pa.array(np.full(len(rows), unit.file, dtype=np.int32)),
                    pa.array(rows),
                    ids,
                    _fixed_binary(hashed.exact, 16),
                    _fixed_binary(sig.astype("<u4", copy=False), 4 * cfg.num_perm),
                ],
                schema=schema,
            )
            if writer is None or in_file >= SIG_FILE_ROWS:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(
                    out / f"part-{n_files:05d}.parquet", schema, compression="zstd"
                )
                n_files, in_file = n_files + 1, 0
            writer.write_table(table)
            in_file += len(rows)
            n += len(rows)
            progress.advance(len(rows))
    if writer is not None:
        writer.close()
    progress.stop()
    return n


def _ids(batch: pa.RecordBatch, label: str, rows: np.ndarray) -> pa.Array:
    generated = pa.array([f"{label}:{r}" for r in rows.tolist()], pa.string())
    if "id" not in batch.schema.names:
        return generated
    given = pc.cast(batch.column("id"), pa.string())
    return pc.if_else(pc.is_null(given), generated, given)


def _check_signatures(sigs: list[Path]) -> list[Manifest]:
    if not sigs:
        raise InputError("no signatures given", "pass the directories `dedup signatures` wrote")
    manifests = []
    for p in sigs:
        if not is_artifact(Path(p), "signatures"):
            raise InputError(
                f"{p} is not a dedup signatures artifact",
                "make one with: llmctl dedup signatures INPUT --shard K/N -o SIGS",
            )
        manifests.append(Manifest.read(Path(p)))
    first = manifests[0]
    for p, m in zip(sigs, manifests, strict=True):
        differ = [k for k in SIG_CONFIG if m.config.get(k) != first.config.get(k)]
        # Shards may read the input at different paths: compare its content fingerprint.
        fingerprint = (m.inputs[0] if m.inputs else {}).get("fingerprint")
        if fingerprint != (first.inputs[0] if first.inputs else {}).get("fingerprint") or differ:
            what = ", ".join(differ) or "input"
            raise InputError(
                f"{p} and {sigs[0]} differ in {what}: they are not shards of one run",
                "compute every shard's signatures from the same INPUT with the same flags",
            )
    n = int(first.stats["shard"].split("/")[1])
    have = sorted(int(m.stats["shard"].split("/")[0]) for m in manifests)
    if any(int(m.stats["shard"].split("/")[1]) != n for m in manifests) or have != list(range(n)):
        missing = sorted(set(range(n)) - set(have))
        extra = sorted({k for k in have if have.count(k) > 1})
        raise InputError(
            f"signatures hold shards {have} of {n}"
            + (f"; missing {', '.join(f'{k}/{n}' for k in missing)}" if missing else "")
            + (f"; repeated {extra}" if extra else ""),
            "pass exactly one signatures directory per shard K/N, K = 0..N-1",
        )
    return manifests


def _load_signatures(
    files: list[Path], num_perm: int, progress: Progress
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read signature files into input order: (pos, rank, exact, sig16).

    rank[i] is the input-order index of the i-th row across the files; the other arrays are in
    input order. Only the low 16 bits of each hash value are kept (see core/minhash.py).
    """
    parts = [np.zeros(0, np.uint64)]
    for f in files:
        t = pq.read_table(f, columns=["file", "row"])
        parts.append(_pos(t.column("file"), t.column("row")))
    pos = np.concatenate(parts)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    if len(pos) > 1 and (pos[1:] == pos[:-1]).any():
        raise InputError("the signatures hold some documents twice", "pass each shard once")
    rank = np.empty(len(pos), dtype=np.int64)
    rank[order] = np.arange(len(pos))
    del order
    exact = np.empty((len(pos), 16), dtype=np.uint8)
    sig16 = np.empty((len(pos), num_perm), dtype=np.uint16)
    progress.start("load signatures", len(pos), "docs")
    at = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=["exact", "minhash"]):
            r = rank[at : at + batch.num_rows]
            exact[r] = _fixed_values(batch.column(0), np.uint8, 16)
            sig16[r] = _fixed_values(batch.column(1), "<u4", num_perm)  # keeps the low 16 bits
            at += batch.num_rows
            progress.advance(batch.num_rows)
        # Arrow's allocator keeps freed pages; decoded files would otherwise pile up in RSS.
        pa.default_memory_pool().release_unused()
    progress.stop()
    return pos, rank, exact, sig16


def _cluster_files(
    files: list[Path], cfg: DedupConfig, out: Path, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cluster the signatures in `files`; write the duplicates table to `out`."""
    t0 = time.perf_counter()
    pos, rank, exact, sig16 = _load_signatures(files, cfg.num_perm, progress)
    if len(pos) == 0:
        raise InputError(
            "the signatures hold no documents", "check the input of `dedup signatures`"
        )
    bands, rows = cfg.lsh()
    kept, first, pair_counts = minhash.find_clusters(
        exact, sig16, cfg.threshold, bands, rows, progress
    )
    del exact
    idx = np.arange(len(kept))
    removed = np.flatnonzero(kept != idx)
    is_exact = first[removed] != removed
    sim = minhash.estimate_jaccard(sig16, np.stack([removed, kept[removed]], axis=1))
    ids = _lookup_ids(files, rank, np.union1d(removed, kept[removed]))
    n_exact = int(is_exact.sum())
    table = pa.table(
        {
            "file": pa.array((pos[removed] >> np.uint64(ROW_BITS)).astype(np.int32)),
            "row": pa.array((pos[removed] & np.uint64((1 << ROW_BITS) - 1)).astype(np.int64)),
            "id": ids(removed),
            "cluster": pa.array(kept[removed]),
            "kept_id": ids(kept[removed]),
            "kind": pa.array(np.where(is_exact, "exact", "near").tolist(), pa.string()),
            "similarity": pa.array(sim.astype(np.float32)),
        }
    )
    pq.write_table(table, out, compression="zstd")
    counts = {
        "documents": len(kept),
        "exact_removed": n_exact,
        "near_removed": len(removed) - n_exact,
        "kept": len(kept) - len(removed),
        "clusters": len(np.unique(kept[removed])),
    }
    stats = {
        "threshold": cfg.threshold,
        "num_perm": cfg.num_perm,
        "ngram": cfg.ngram,
        "bands": bands,
        "rows": rows,
        **pair_counts,
        "cluster_bytes_per_doc": 2 * cfg.num_perm + 16 + 8 + 3 * 8,
        "seconds_cluster": round(time.perf_counter() - t0, 3),
    }
    return counts, stats


def _lookup_ids(files: list[Path], rank: np.ndarray, need: np.ndarray) -> Any:
    """Read the ids of the documents `need` (sorted input-order indices); return a lookup."""
    found = np.empty(len(need), dtype=object)
    at = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["id"]):
            r = rank[at : at + batch.num_rows]
            at += batch.num_rows
            j = np.searchsorted(need, r)
            hit = (
                (j < len(need)) & (need[np.minimum(j, len(need) - 1)] == r) if len(need) else r < 0
            )
            if hit.any():
                found[j[hit]] = np.asarray(batch.column(0).to_pylist(), dtype=object)[hit]
        pa.default_memory_pool().release_unused()

    def ids(which: np.ndarray) -> pa.Array:
        return pa.array(found[np.searchsorted(need, which)].tolist(), pa.string())

    return ids


def _write_survivors(
    source: DocSource,
    units: list[Unit],
    duplicates: Path,
    writer: DocWriter,
    report: Path | None,
    progress: Progress,
) -> dict[str, Any]:
    """Stream `units`, writing the documents not listed in `duplicates`; report this part's removals."""
    dup = pq.read_table(duplicates)
    dpos = _pos(dup.column("file"), dup.column("row"))
    removed = np.sort(dpos)
    seen = []
    known = [u.rows for u in units]
    progress.start("write survivors", sum(known) if None not in known else None, "docs")
    n = 0
    for unit in units:
        for batch, pos in _unit_rows(source, unit, None):
            j = np.searchsorted(removed, pos)
            gone = (j < len(removed)) & (removed[np.minimum(j, len(removed) - 1)] == pos)
            seen.append(pos[gone])
            if not gone.all():
                writer.write(batch.filter(pa.array(~gone)))
            n += batch.num_rows
            progress.advance(batch.num_rows)
    progress.stop()
    if report is not None:
        mine = np.isin(dpos, np.concatenate([np.zeros(0, np.uint64), *seen]))
        report.mkdir()
        pq.write_table(
            dup.filter(pa.array(mine)).drop_columns(["file", "row"]),
            report / "part-00000.parquet",
            compression="zstd",
        )
    removed_here = int(sum(len(s) for s in seen))
    return {"documents_read": n, "written": n - removed_here, "removed": removed_here}


def _commit_docs(
    dst: str | Path,
    stage: str,
    cfg: DedupConfig,
    inputs: list[dict[str, Any]],
    stats: dict[str, Any],
    body: Any,
    force: bool,
    stdout: BinaryIO | None,
) -> Manifest:
    """Run `body(writer, report_dir)` into a docs artifact at `dst`, or a stream for "-"."""
    if str(dst) == "-":
        writer = DocWriter(stdout or sys.stdout.buffer)
        res = body(writer, None)
        writer.close()
        m = Manifest(kind="docs", stage=stage, config=to_dict(cfg), inputs=inputs)
        _fill(m, res, stats, writer)
        return m
    with commit_output(
        Path(dst), kind="docs", stage=stage, config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        writer = DocWriter(out.path)
        res = body(writer, out.path / "duplicates")
        writer.close()
        _fill(out.manifest, res, stats, writer)
    return out.manifest


def _fill(m: Manifest, res: dict[str, Any], stats: dict[str, Any], writer: DocWriter) -> None:
    counts = res.get("counts", res)
    m.counts = {**counts, "bytes": writer.bytes, "shards": writer.shards}
    m.stats = {**stats, **res.get("stats", {})}
