"""The per-document work of crawl-filter, run inside worker processes, and its bookkeeping.

`process_chunk` turns a list of items (WARC responses or texts) into one Outcome per item, in
order: kept, rejected (with the filter, rule and measured value) or unreadable (with a reason).
Filters run stage by stage over the whole chunk, so the fastText models see batches. With
`sweep=True` a dropped document is still measured by every later filter, which is what
`SweepTable` needs to re-judge it at other thresholds.

Only crawl_filter.py imports this module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from llmctl.core.classify import LangId, QualityModel
from llmctl.core.pii import redact
from llmctl.core.quality import Drop, Rule, UrlBlocklist, check
from llmctl.core.warc import Response, decode_html, extract_text

if TYPE_CHECKING:
    from llmctl.core.warc import WarcReport
    from llmctl.stages.crawl_filter import CrawlFilterConfig

UNREADABLE_EXAMPLES = 20  # unreadable records listed by id in the manifest


@dataclass(frozen=True)
class TextItem:
    """A document from a docs input."""

    id: str
    url: str | None
    text: str


Item = Union[Response, TextItem]  # noqa: UP007 - a runtime alias


@dataclass
class Outcome:
    """What became of one input document."""

    status: Literal["kept", "rejected", "unreadable"]
    id: str
    row: dict[str, Any] | None  # the output row (kept or rejected); None when unreadable
    bytes_in: int  # UTF-8 bytes of the document's text before filtering
    reason: str = ""  # rejected: the filter; unreadable: why
    rule: str = ""
    detail: str = ""
    stats: Counter = field(default_factory=Counter)
    measures: dict[str, float] | None = None  # sweep mode: every rule's measured value


@dataclass
class _Doc:
    id: str
    url: str | None
    text: str = ""
    bytes_in: int = 0
    lang: str | None = None
    lang_score: float | None = None
    quality: float | None = None
    unreadable: str = ""
    detail: str = ""
    drop: Drop | None = None
    drop_text: str | None = None
    sweepable: bool = True  # False for drops no threshold can undo (not HTML, no text)
    measures: dict[str, float] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)


def chain(cfg: CrawlFilterConfig) -> list[tuple[str, list[Rule]]]:
    """The configured filters in pipeline order, each with its rules."""
    out: list[tuple[str, list[Rule]]] = []
    if "url_blocklist" in cfg.filters:
        out.append(("url_blocklist", UrlBlocklist(path=cfg.url_blocklist).rules()))
    if not cfg.any_lang:
        out.append(
            (
                "lang",
                [
                    Rule("lang", "lang_ok", "min", 1, sweep=False),
                    Rule("min_lang_score", "lang_score", "min", cfg.min_lang_score),
                ],
            )
        )
    for name in ("gopher_repetition", "gopher_quality", "c4"):
        if name in cfg.filters:
            out.append((name, getattr(cfg, name).rules()))
    if cfg.quality_model:
        out.append(("quality", [Rule("min_quality", "quality_score", "min", cfg.min_quality)]))
    return out


def check_models(cfg: CrawlFilterConfig) -> None:
    """Load the models once in the calling process, so a missing one fails before any work."""
    LangId(cfg.lid_model)
    if cfg.quality_model:
        QualityModel(cfg.quality_model)


class Pipeline:
    """The filters of one config, with their models loaded (one per worker process)."""

    def __init__(self, cfg: CrawlFilterConfig, sweep: bool) -> None:
        self.cfg = cfg
        self.sweep = sweep
        self.rules = dict(chain(cfg))
        self.lid = LangId(cfg.lid_model)
        self.quality = QualityModel(cfg.quality_model) if cfg.quality_model else None
        self.url = UrlBlocklist(path=cfg.url_blocklist)

    def process(self, items: list[Item]) -> list[Outcome]:
        """One Outcome per item, in order."""
        docs = [self._prepare(it) for it in items]
        if "url_blocklist" in self.rules:
            for d in self._live(docs):
                m, hit = self.url.measure_url(d.url)
                self._judge(d, "url_blocklist", m, hit)
        self._lang(docs)
        gopher = [n for n in ("gopher_repetition", "gopher_quality") if n in self.rules]
        for d in self._live(docs):  # both filters per document: they share its word split
            for name in gopher:
                if d.drop is None or self.sweep:
                    self._judge(d, name, getattr(self.cfg, name).measure(d.text))
        if "c4" in self.rules:
            self._c4(docs)
        if self.quality is not None:
            live = self._live(docs)
            for d, s in zip(live, self.quality.score([d.text for d in live]), strict=True):
                d.quality = s
                self._judge(d, "quality", {"quality_score": s})
        if self.cfg.redact_pii:
            for d in docs:
                if not d.unreadable and d.drop is None:
                    d.text, counts = redact(d.text)
                    d.stats.update({f"pii:{k}": v for k, v in counts.items()})
        return [self._outcome(d) for d in docs]

    # -- steps -------------------------------------------------------------------------------------

    def _prepare(self, it: Item) -> _Doc:
        if isinstance(it, TextItem):
            d = _Doc(it.id, it.url, it.text, len(it.text.encode("utf-8", "replace")))
            if not it.text.strip():
                self._fixed_drop(d, "no_text", "empty", "empty document")
            return d
        d = _Doc(it.id, it.url)
        if it.problem:
            d.unreadable, d.detail = it.problem, it.detail
            return d
        if not 200 <= (it.status or 0) < 300:
            self._fixed_drop(d, "http_status", "status", f"HTTP {it.status}", it.status)
            return d
        if not it.is_html:
            self._fixed_drop(d, "not_html", "content_type", it.content_type or "unknown")
            return d
        html, how = decode_html(it.body, it.charset)
        d.stats[f"charset:{how.split(':')[0]}"] += 1
        try:
            d.text = extract_text(html, self.cfg.extractor)
        except Exception as e:  # noqa: BLE001 - extractors raise many types on hostile HTML
            d.unreadable, d.detail = "extract_failed", f"{type(e).__name__}: {e}"
            return d
        d.bytes_in = len(d.text.encode("utf-8", "replace"))
        if not d.text.strip():
            self._fixed_drop(d, "no_text", "empty", "no main text found")
        return d

    def _lang(self, docs: list[_Doc]) -> None:
        live = self._live(docs)
        for d, (lang, score) in zip(live, self.lid.predict([d.text for d in live]), strict=True):
            d.lang, d.lang_score = lang, score
            if "lang" in self.rules:
                ok = float(lang in self.cfg.lang)
                detail = f"lang {lang} p={score:.3f}"
                self._judge(d, "lang", {"lang_ok": ok, "lang_score": score}, detail)

    def _c4(self, docs: list[_Doc]) -> None:
        for d in self._live(docs):
            cleaned, m, removed = self.cfg.c4.clean(d.text)
            before = d.drop
            self._judge(d, "c4", m)
            if d.drop is before:  # not dropped here: the cleaned text goes on
                d.text = cleaned
                d.stats.update({f"c4:{k}": v for k, v in removed.items()})

    # -- helpers -----------------------------------------------------------------------------------

    def _live(self, docs: list[_Doc]) -> list[_Doc]:
        """Documents the next filter looks at: not yet dropped (sweep: any still measurable)."""
        return [
            d for d in docs if not d.unreadable and (d.drop is None or (self.sweep and d.sweepable))
        ]

    def _judge(self, d: _Doc, name: str, m: dict[str, float], detail: str = "") -> None:
        if self.sweep:
            d.measures.update({f"{name}.{k}": float(v) for k, v in m.items()})
        if d.drop is None:
            drop = check(name, self.rules[name], m)
            if drop is not None:
                d.drop = Drop(drop.reason, drop.rule, drop.value, detail or drop.detail)
                d.drop_text = d.text

    @staticmethod
    def _fixed_drop(
        d: _Doc, reason: str, rule: str, detail: str, value: float | None = None
    ) -> None:
        d.drop = Drop(reason, rule, value, detail)
        d.drop_text = d.text
        d.sweepable = False

    def _outcome(self, d: _Doc) -> Outcome:
        if d.unreadable:
            return Outcome("unreadable", d.id, None, 0, d.unreadable, detail=d.detail)
        row = {
            "id": d.id,
            "url": d.url,
            "text": d.text,
            "lang": d.lang,
            "lang_score": d.lang_score,
            "quality_score": d.quality,
        }
        measures = d.measures if (self.sweep and d.sweepable) else None
        if d.drop is None:
            return Outcome("kept", d.id, row, d.bytes_in, stats=d.stats, measures=measures)
        row["text"] = d.drop_text if d.drop_text is not None else d.text
        row |= {
            "reason": d.drop.reason,
            "rule": d.drop.rule,
            "value": d.drop.value,
            "detail": d.drop.detail,
        }
        return Outcome(
            "rejected", d.id, row, d.bytes_in, d.drop.reason, d.drop.rule, d.drop.detail,
            d.stats, measures,
        )  # fmt: skip


# Worker side: one Pipeline per process, built once.
_PIPELINE: Pipeline | None = None


def init_worker(cfg: CrawlFilterConfig, sweep: bool) -> None:
    """Pool initializer: load the models for this process."""
    global _PIPELINE
    _PIPELINE = Pipeline(cfg, sweep)


def process_chunk(items: list[Item]) -> list[Outcome]:
    """Pool task: filter one chunk."""
    assert _PIPELINE is not None
    return _PIPELINE.process(items)


# -- bookkeeping -----------------------------------------------------------------------------------


class Tally:
    """Counts and per-filter statistics over all outcomes."""

    def __init__(self) -> None:
        self.documents = self.kept = self.rejected = 0
        self.bytes_in = self.bytes_kept = 0
        self.unreadable: Counter = Counter()
        self.removed: dict[str, dict[str, Any]] = {}
        self.tags: Counter = Counter()
        self.langs: Counter = Counter()
        self.unreadable_examples: list[dict[str, str]] = []

    def add(self, o: Outcome) -> None:
        """Count one outcome."""
        self.documents += 1
        self.bytes_in += o.bytes_in
        self.tags.update(o.stats)
        if o.row is not None and o.row["lang"] is not None:
            self.langs[o.row["lang"]] += 1
        if o.status == "kept":
            self.kept += 1
            self.bytes_kept += len(o.row["text"].encode("utf-8", "replace"))
        elif o.status == "rejected":
            self.rejected += 1
            r = self.removed.setdefault(o.reason, {"docs": 0, "bytes": 0, "rules": Counter()})
            r["docs"] += 1
            r["bytes"] += o.bytes_in
            r["rules"][o.rule] += 1
        else:
            self.unreadable[o.reason] += 1
            if len(self.unreadable_examples) < UNREADABLE_EXAMPLES:
                self.unreadable_examples.append(
                    {"id": o.id, "reason": o.reason, "detail": o.detail}
                )

    def counts(self, report: WarcReport) -> dict[str, Any]:
        """The manifest's counts; kept + rejected + unreadable = documents is checked here."""
        unreadable = sum(self.unreadable.values())
        if self.kept + self.rejected + unreadable != self.documents:
            raise RuntimeError(
                f"crawl-filter lost documents: {self.kept} kept + {self.rejected} rejected + "
                f"{unreadable} unreadable != {self.documents} in"
            )
        return {
            "documents": self.documents,
            "kept": self.kept,
            "rejected": self.rejected,
            "unreadable": unreadable,
            "bytes_in": self.bytes_in,
            "bytes_kept": self.bytes_kept,
            "warc_records": report.records,
            "warc_records_skipped": sum(report.skipped.values()),
        }

    def stats(self, report: WarcReport, cfg: CrawlFilterConfig, seconds: float) -> dict[str, Any]:
        """The manifest's stats: removals per filter, line removals, PII, problems, speed."""
        order = ["no_text", "http_status", "not_html"] + [n for n, _ in chain(cfg)]
        removed = {
            k: {**v, "rules": dict(v["rules"].most_common())}
            for k, v in sorted(self.removed.items(), key=lambda kv: _rank(order, kv[0]))
        }

        def prefixed(p: str) -> dict[str, int]:
            return {k[len(p) :]: v for k, v in sorted(self.tags.items()) if k.startswith(p)}

        return {
            "removed": removed,
            "unreadable": dict(self.unreadable.most_common()),
            "unreadable_examples": self.unreadable_examples,
            "skipped_records": dict(report.skipped.most_common()),
            "problems": report.problems,
            "c4_lines_removed": prefixed("c4:"),
            "pii_redacted": {k: prefixed("pii:").get(k, 0) for k in ("email", "ip", "phone")}
            if cfg.redact_pii
            else None,
            "charset_source": prefixed("charset:"),
            "languages": dict(self.langs.most_common(10)),
            "extractor": cfg.extractor,
            "seconds": round(seconds, 3),
            "docs_per_second": round(self.documents / max(seconds, 1e-9), 1),
        }


def _rank(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


class SweepTable:
    """Measured values of every document, re-judged at other thresholds (crawl-filter --sweep)."""

    def __init__(self, cfg: CrawlFilterConfig) -> None:
        self.factors = cfg.sweep_factors
        self.rules = [(name, r) for name, rules in chain(cfg) for r in rules]
        self.values: list[list[float]] = []
        self.bytes: list[int] = []
        self.total_docs = 0
        self.total_bytes = 0

    def add(self, o: Outcome) -> None:
        """Record one outcome (fixed drops and unreadable documents only count in the totals)."""
        self.total_docs += 1
        self.total_bytes += o.bytes_in
        if o.measures is not None:
            self.values.append([o.measures[f"{n}.{r.measure}"] for n, r in self.rules])
            self.bytes.append(o.bytes_in)

    def rows(self) -> list[dict[str, Any]]:
        """One row for the configured pipeline, then one per (sweepable rule, factor)."""
        v = np.array(self.values, dtype=np.float64).reshape(len(self.values), len(self.rules))
        b = np.array(self.bytes, dtype=np.int64)
        passes = np.ones((len(v), len(self.rules)), bool)
        for j, (_, r) in enumerate(self.rules):
            passes[:, j] = _passes(r, v[:, j], r.threshold)
        out = [self._row("all", "configured", None, 1.0, passes.all(axis=1), b)]
        for j, (name, r) in enumerate(self.rules):
            if not r.sweep:
                continue
            others = np.delete(passes, j, axis=1).all(axis=1)
            for f in self.factors:
                t = scaled(r, f)
                out.append(self._row(name, r.name, t, f, others & _passes(r, v[:, j], t), b))
        return out

    def _row(
        self, flt: str, rule: str, t: float | None, factor: float, keep: np.ndarray, b: np.ndarray
    ) -> dict[str, Any]:
        docs, nbytes = int(keep.sum()), int(b[keep].sum())
        return {
            "filter": flt,
            "rule": rule,
            "factor": factor,
            "threshold": t,
            "docs": docs,
            "bytes": nbytes,
            "docs_frac": docs / max(1, self.total_docs),
            "bytes_frac": nbytes / max(1, self.total_bytes),
        }


def _passes(r: Rule, values: np.ndarray, t: float) -> np.ndarray:
    return values >= t if r.kind == "min" else values <= t


def scaled(r: Rule, factor: float) -> float:
    """The rule's threshold times `factor`; counts stay integers, fractions stay <= 1."""
    t = r.threshold * factor
    if isinstance(r.threshold, int):
        return float(max(0, round(t)))
    return min(round(t, 4), 1.0) if r.threshold <= 1 else round(t, 4)
