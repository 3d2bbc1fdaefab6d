"""eval decontam: evaluation set + training docs -> eval artifact listing contaminated items.

An evaluation item counts as contaminated when its word n-grams (13 by default, as in GPT-3's
contamination study, Brown et al., 2020, appendix C) also occur in the training text. Text is
normalised the same way on both sides: lower-cased, split into runs of letters and digits
(punctuation and whitespace differences do not hide an overlap). The eval set's n-grams go into one
in-memory table (n-gram -> items); the training docs are then streamed once, so the training
corpus may be far larger than memory. Per item the report gives the share of its distinct n-grams
found in training text, the number found, one example n-gram and the first few training documents
(by row number) holding one. An item is flagged when that share is at least `--min-overlap`
(default: any shared n-gram, GPT-3's rule; PaLM used 8-grams and 0.7). Items with fewer words than n
cannot be checked and are counted apart, as GPT-3 does not either.

Departure: every string field of an eval row is checked (lists of strings too, e.g. choices),
unless `--fields` names some; GPT-3 checked the question side only for some tasks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.chatdata import read_rows
from llmctl.core.config import require, to_dict
from llmctl.core.docs import open_docs
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress

RESULTS = "results.json"
FLAGGED = "contaminated.jsonl"
_WORD = re.compile(r"[^\W_]+")
_MAX_DOCS_PER_ITEM = 5


@dataclass(frozen=True, kw_only=True)
class DecontamConfig:
    """Settings of `llmctl eval decontam`."""

    n: int = 13  # words per n-gram
    min_overlap: float = 0.0  # flag an item when this share of its n-grams is found (0 = any)
    fields: tuple[str, ...] = ()  # eval-row fields to check (empty = every string field)
    text_column: str = "text"  # column of the training docs holding the text
    max_docs: int = 0  # scan at most this many training docs (0 = all)

    def __post_init__(self) -> None:
        require(self.n >= 1, f"--n must be >= 1, got {self.n}")
        require(
            0.0 <= self.min_overlap <= 1.0,
            f"--min-overlap must be in [0, 1], got {self.min_overlap}",
        )
        require(self.max_docs >= 0, f"--max-docs must be >= 0, got {self.max_docs}")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


def ngrams(ws: Sequence[str], n: int) -> Iterator[str]:
    """Every n-word window, joined by single spaces."""
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i : i + n])


def item_text(row: dict[str, Any], fields: Sequence[str]) -> str:
    """The text of an eval row that is checked: the named fields, or every string field."""
    keys = fields or [k for k in row if isinstance(row[k], (str, list))]
    parts: list[str] = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts += [x for x in v if isinstance(x, str)]
    return "\n".join(parts)


def run(
    eval_set: str | Path,
    train: str | Path,
    dst: Path,
    cfg: DecontamConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Find eval items whose n-grams occur in the training docs; write the report.

    Raises:
        InputError: Unreadable inputs, a missing text column, or a field no row has.
    """
    check_output(dst, force)
    rows, _ = read_rows(eval_set)
    items = [row for _, row in rows]
    grams, too_short = index_items(items, cfg)
    found: list[set[str]] = [set() for _ in items]
    docs_of: list[list[int]] = [[] for _ in items]
    src = open_docs(train, text_column=cfg.text_column)
    progress.start("scan train", cfg.max_docs or None, "docs")
    n_docs = scan(src.texts(), grams, found, docs_of, cfg, progress)
    progress.stop()
    flagged = []
    for i, row in enumerate(items):
        gs = _item_grams(row, cfg)
        if not gs or not found[i]:
            continue
        share = len(found[i]) / len(gs)
        if share >= cfg.min_overlap:
            flagged.append({
                "item": i, "id": _item_id(row), "overlap": round(share, 4),
                "ngrams_found": len(found[i]), "ngrams": len(gs),
                "example": min(found[i]), "train_docs": docs_of[i],
            })  # fmt: skip
    checked = len(items) - too_short
    results = {
        "items": len(items),
        "checked": checked,
        "too_short": too_short,
        "contaminated": len(flagged),
        "contaminated_fraction": len(flagged) / checked if checked else 0.0,
        "train_docs": n_docs,
        "n": cfg.n,
        "min_overlap": cfg.min_overlap,
    }
    inputs = [input_record(eval_set, "eval-set"), input_record(train, "docs")]
    with commit_output(
        dst, kind="eval", stage="eval-decontam", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        (out.path / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        with open(out.path / FLAGGED, "w", encoding="utf-8") as f:
            for r in flagged:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        out.manifest.counts = {k: results[k] for k in ("items", "checked", "train_docs")}
        out.manifest.stats = {k: results[k] for k in ("contaminated", "contaminated_fraction")}
    return out.manifest


def _item_grams(row: dict[str, Any], cfg: DecontamConfig) -> set[str]:
    return set(ngrams(words(item_text(row, cfg.fields)), cfg.n))


def _item_id(row: dict[str, Any]) -> Any:
    return next((row[k] for k in ("id", "task_id", "doc_id", "idx") if k in row), None)


def index_items(
    items: Sequence[dict[str, Any]], cfg: DecontamConfig
) -> tuple[dict[str, list[int]], int]:
    """n-gram -> the items holding it, and how many items are shorter than n words.

    Raises:
        InputError: A field named in --fields appears in no row.
    """
    for f in cfg.fields:
        if not any(f in row for row in items):
            cols = sorted({k for row in items[:50] for k in row})
            raise InputError(
                f"no eval row has a field {f!r} (found: {', '.join(cols)})",
                "pass --fields with existing names, or leave it out to check every text field",
            )
    grams: dict[str, list[int]] = {}
    too_short = 0
    for i, row in enumerate(items):
        gs = _item_grams(row, cfg)
        too_short += not gs
        for g in gs:
            grams.setdefault(g, []).append(i)
    return grams, too_short


def scan(
    texts: Iterable[str],
    grams: dict[str, list[int]],
    found: list[set[str]],
    docs_of: list[list[int]],
    cfg: DecontamConfig,
    progress: Progress = SILENT,
) -> int:
    """Stream training texts; record each eval n-gram found (per item) and where. Returns docs read."""
    n_docs = 0
    for d, text in enumerate(texts):
        if cfg.max_docs and d >= cfg.max_docs:
            break
        n_docs += 1
        hit: set[int] = set()
        for g in ngrams(words(text), cfg.n):
            for i in grams.get(g, ()):
                found[i].add(g)
                hit.add(i)
        for i in hit:
            if len(docs_of[i]) < _MAX_DOCS_PER_ITEM:
                docs_of[i].append(d)
        if d % 256 == 255:
            progress.advance(256)
    return n_docs
