"""corpus: build the embedded default corpus, with no download, from text every Python install ships.

`--format docs` (default) writes a docs dataset; `--format warc` writes the same prose as a raw web
crawl instead (a `crawl` artifact: `crawl.warc.gz` with boilerplate, duplicates, spam, foreign and
broken records, plus `labels.jsonl` ground truth; see core/crawlgen.py) for `crawl-filter`.
`--format chat|prefs|prompts` writes post-training data derived from the same stdlib text
(conversations for sft, preference pairs for rm, prompts with references for ppo), from disjoint
sets of functions; see core/chatgen.py for where the text comes from and how each set is made.

Three kinds of documents, all from the running interpreter's standard library:
    topics      the documentation topics that `help()` shows (`pydoc_data.topics`): reference prose
    docstrings  per module: the module docstring plus each class and function docstring, as prose
    code        the source of each module

Test suites (`test/`, `tests/`, `idle_test/`) and site-packages are left out. Files are visited in
sorted order, so the output is byte-identical for the same Python version (recorded in the manifest).
Columns: id, text, source (topics|docstrings|code), path.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow as pa

from llmctl.core import chatgen
from llmctl.core.artifacts import Manifest, commit_output
from llmctl.core.config import require, to_dict
from llmctl.core.docs import DocWriter
from llmctl.core.errors import ConfigError
from llmctl.core.progress import SILENT, Progress

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Settings of `llmctl corpus`."""

    source: Literal["stdlib"] = "stdlib"  # the only embedded source so far
    # a docs dataset, a raw crawl (.warc.gz + labels), or post-training data (core/chatgen.py)
    format: Literal["docs", "warc", "chat", "prefs", "prompts"] = "docs"
    kinds: tuple[str, ...] = ("topics", "docstrings", "code")  # which document kinds to emit
    max_docs: int = 0  # stop after this many documents or rows (0 = all)
    seed: int = 0  # drives --format warc's planted edits and the templates of chat/prefs/prompts

    def __post_init__(self) -> None:
        bad = set(self.kinds) - {"topics", "docstrings", "code"}
        require(
            not bad,
            f"--kinds: unknown kind(s) {', '.join(sorted(bad))} (choose topics, docstrings, code)",
        )
        formats = ("docs", "warc", "chat", "prefs", "prompts")
        require(
            self.format in formats,
            f"--format must be one of {', '.join(formats)}, got {self.format!r}",
        )
        require(self.max_docs >= 0, f"--max-docs must be >= 0, got {self.max_docs}")


def stdlib_files() -> list[Path]:
    """The stdlib's .py files, sorted, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]  # prune: site-packages can be large
        found += [Path(d, f) for f in files if f.endswith(".py")]
    return sorted(found)


def stdlib_modules() -> Iterator[tuple[str, str]]:
    """(module name, source) of each readable stdlib file, in `stdlib_files` order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        try:
            code = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        rel = path.relative_to(root).as_posix()
        yield rel[:-3].replace("/", ".").removesuffix(".__init__"), code


def _docstrings(tree: ast.Module, module: str) -> str:
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and not node.name.startswith("_"):
                parts.append(f"{module}.{node.name}\n\n{d}")
    return "\n\n".join(parts)


def documents(cfg: CorpusConfig) -> Iterator[dict[str, str]]:
    """Yield {id, text, source, path} rows in a fixed order."""
    if "topics" in cfg.kinds:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield {
                "id": f"topics/{name}",
                "text": topics[name],
                "source": "topics",
                "path": f"pydoc_data.topics:{name}",
            }
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        try:
            code = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        if "docstrings" in cfg.kinds:
            try:
                text = _docstrings(ast.parse(code), module)
            except (SyntaxError, ValueError):
                text = ""
            if text:
                yield {"id": f"docstrings/{rel}", "text": text, "source": "docstrings", "path": rel}
        if "code" in cfg.kinds and code.strip():
            yield {"id": f"code/{rel}", "text": code, "source": "code", "path": rel}


def run(
    dst: Path | str,
    cfg: CorpusConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
    stdout: BinaryIO | None = None,
) -> Manifest | None:
    """Write the corpus as a docs artifact at `dst`, or as an Arrow stream when `dst` is "-".

    Returns:
        The manifest (None for a stream, which has no manifest).
    """
    if cfg.format == "warc":
        return _run_warc(Path(dst), cfg, force=force, progress=progress)
    if str(dst) == "-":
        writer = DocWriter(stdout or sys.stdout.buffer)
        _write(writer, cfg, progress)
        writer.close()
        return None
    with commit_output(
        Path(dst), kind="docs", stage="corpus", config=to_dict(cfg), inputs=[], force=force
    ) as out:
        writer = DocWriter(out.path)
        by_kind = _write(writer, cfg, progress)
        writer.close()
        out.manifest.counts = {
            "documents": writer.rows,
            "bytes": writer.bytes,
            "shards": writer.shards,
            **by_kind,
        }
        out.manifest.stats = {
            "python": sys.version.split()[0],
            "stdlib": sysconfig.get_paths()["stdlib"],
        }
        if cfg.format != "docs":
            lo, hi = chatgen.SPLITS[cfg.format]
            out.manifest.stats["split"] = f"sha256(subject) % 100 in [{lo}, {hi})"
    return out.manifest


def _run_warc(dst: Path, cfg: CorpusConfig, *, force: bool, progress: Progress) -> Manifest:
    from llmctl.core.crawlgen import CrawlSpec, build_crawl

    if str(dst) == "-":
        raise ConfigError("--format warc writes a directory, not a stream", "pass -o DIR")
    with commit_output(
        dst, kind="crawl", stage="corpus", config=to_dict(cfg), inputs=[], force=force
    ) as out:
        progress.start("build crawl", None)
        counts = build_crawl(out.path, CrawlSpec(seed=cfg.seed, max_good=cfg.max_docs))
        progress.stop()
        out.manifest.counts = {"records": sum(counts.values()), **counts}
        out.manifest.stats = {
            "python": sys.version.split()[0],
            "bytes": (out.path / "crawl.warc.gz").stat().st_size,
        }
    return out.manifest


def _rows(cfg: CorpusConfig) -> Iterator[dict]:
    """The rows of the chosen format: documents, or one post-training set (core/chatgen.py)."""
    if cfg.format == "docs":
        yield from documents(cfg)
        return
    from pydoc_data.topics import topics

    unique = chatgen.unique_names(stdlib_modules())
    subjects = chain(chatgen.topic_subjects(topics), chatgen.stdlib_subjects(stdlib_modules()))
    yield from chatgen.build_rows(
        cfg.format, subjects, seed=cfg.seed, unique=unique, limit=cfg.max_docs
    )


def _write(writer: DocWriter, cfg: CorpusConfig, progress: Progress) -> dict[str, int]:
    """Write the rows in batches; returns row counts by kind for the post-training formats."""
    schema = chatgen.SCHEMAS.get(cfg.format)
    by_kind: Counter[str] = Counter()
    rows: list[dict] = []
    progress.start(f"build {cfg.format}", cfg.max_docs or None, "rows")
    for n, row in enumerate(_rows(cfg), 1):
        rows.append(row)
        if cfg.format == "prefs":
            by_kind[f"rejected_{row['rejected_kind']}"] += 1
        elif cfg.format != "docs":
            by_kind[row["id"].rsplit("/", 1)[1]] += 1  # the question kind(s)
        if len(rows) >= 512:
            writer.write(pa.RecordBatch.from_pylist(rows, schema=schema))
            progress.advance(len(rows))
            rows = []
        if cfg.max_docs and n >= cfg.max_docs:
            break
    if rows:
        writer.write(pa.RecordBatch.from_pylist(rows, schema=schema))
        progress.advance(len(rows))
    progress.stop()
    return dict(sorted(by_kind.items()))
