"""crawl-filter and dedup measured on the embedded crawl against its ground truth (labels.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmctl.core.crawlgen import CrawlSpec, build_crawl
from llmctl.stages import crawl_filter, dedup

SPEC = CrawlSpec(
    max_good=60,
    exact_dups=8,
    near_dups=16,
    far_edits=8,
    spam=4,
    short=4,
    foreign_per_lang=2,
    charset_pages=3,
)
BOILERPLATE = [
    "All rights reserved",
    "Accept all cookies",
    "Sign up for our newsletter",
    "Related pages",
    "Privacy policy",
]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("crawl")
    build_crawl(out, SPEC)
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    return out / "crawl.warc.gz", {
        lb["url"]: lb for lb in labels if lb["record_type"] == "response"
    }


def rows(path: Path) -> list[dict]:
    files = sorted(path.glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def filtered(crawl, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # noqa: ANN001
    out = tmp_path_factory.mktemp("cf") / "docs"
    m = crawl_filter.run([str(crawl[0])], out, crawl_filter.CrawlFilterConfig(workers=1))
    return out, m.counts


@pytest.fixture(scope="module")
def extracted(crawl, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """Every readable HTML page, extracted, with no filter at all (to test extraction and dedup alone)."""
    out = tmp_path_factory.mktemp("cf") / "all"
    crawl_filter.run(
        [str(crawl[0])], out, crawl_filter.CrawlFilterConfig(workers=1, filters=(), lang=("any",))
    )
    return out


def test_every_record_is_accounted_for(crawl, filtered) -> None:  # noqa: ANN001
    _, labels = crawl
    path, counts = filtered
    kept, rejected = rows(path), rows(path / "rejected")
    assert (
        counts["kept"] + counts["rejected"] + counts["unreadable"]
        == counts["documents"]
        == len(labels)
    )
    assert len(kept) == counts["kept"]
    assert len(rejected) == counts["rejected"]


def test_english_kept_other_languages_dropped(crawl, filtered) -> None:  # noqa: ANN001
    _, labels = crawl
    path, _ = filtered
    kept = {r["url"]: r for r in rows(path)}
    rejected = {r["url"]: r for r in rows(path / "rejected")}
    foreign = [u for u, lb in labels.items() if lb["kind"] == "foreign"]
    assert foreign, "the crawl plants foreign pages from /usr/share/man/{de,fr,es,it}"
    assert all(u in rejected and rejected[u]["reason"] == "lang" for u in foreign)
    assert all(r["lang"] == "en" for r in kept.values())
    english = [u for u, lb in labels.items() if lb["kind"] == "good"]
    detected = [(kept.get(u) or rejected.get(u) or {}).get("lang") for u in english]
    assert sum(d == "en" for d in detected) / len(english) >= 0.95


def test_spam_short_and_broken_records_are_dropped(crawl, filtered) -> None:  # noqa: ANN001
    _, labels = crawl
    kept = {r["url"] for r in rows(filtered[0])}
    for kind in ("spam", "short", "malformed", "non_html"):
        urls = [u for u, lb in labels.items() if lb["kind"] == kind]
        assert urls, kind
        assert not kept & set(urls), kind


def test_main_text_kept_boilerplate_dropped(crawl, extracted) -> None:  # noqa: ANN001
    _, labels = crawl
    pages = {r["url"]: r["text"] for r in rows(extracted)}
    recalls = []
    for url, lb in labels.items():
        if lb["kind"] not in ("good", "charset"):
            continue
        text = " ".join(pages[url].split())  # HTML collapses runs of whitespace inside <p>
        assert not [b for b in BOILERPLATE if b in text], url
        lines = [
            " ".join(ln.split()) for ln in lb["main_text"].splitlines() if len(ln.strip()) >= 20
        ]
        recalls.append(sum(ln in text for ln in lines) / max(1, len(lines)))
    assert min(recalls) >= 0.7
    assert sum(recalls) / len(recalls) >= 0.95


def test_declared_charset_is_honoured(crawl, extracted) -> None:  # noqa: ANN001
    _, labels = crawl
    pages = {r["url"]: r["text"] for r in rows(extracted)}
    for url, lb in labels.items():
        if lb["kind"] == "charset":
            assert "Café, naïve, déjà vu — «quoted»." in pages[url]


def test_dedup_on_planted_pairs(crawl, extracted, tmp_path: Path) -> None:  # noqa: ANN001
    _, labels = crawl
    m = dedup.run(extracted, tmp_path / "dd", dedup.DedupConfig())
    survivors = {r["url"] for r in rows(tmp_path / "dd")}
    threshold = dedup.DedupConfig().threshold
    exact = [(u, lb["dup_of"]) for u, lb in labels.items() if lb["kind"] == "exact_dup"]
    above = [
        (u, lb["dup_of"])
        for u, lb in labels.items()
        if lb["kind"] == "near_dup" and lb["jaccard"] >= threshold
    ]
    below = [
        (u, lb["dup_of"])
        for u, lb in labels.items()
        if lb["jaccard"] is not None and lb["jaccard"] < threshold - 0.3
    ]
    assert exact
    assert above
    assert below
    # every exact copy removed, one of each pair kept
    assert all((a in survivors) != (b in survivors) for a, b in exact)
    recall = sum((a in survivors) != (b in survivors) for a, b in above) / len(above)
    precision_ok = sum(a in survivors and b in survivors for a, b in below) / len(below)
    assert recall >= 0.95, recall
    assert precision_ok >= 0.95, precision_ok
    assert (
        m.counts["kept"] + m.counts["exact_removed"] + m.counts["near_removed"]
        == m.counts["documents"]
    )
