"""The embedded raw crawl: deterministic, every record labelled, planted pairs measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator

from llmctl.core.crawlgen import CrawlSpec, build_crawl, english_rate, jaccard, strip_troff

SMALL = CrawlSpec(
    max_good=40,
    exact_dups=4,
    near_dups=6,
    far_edits=3,
    spam=2,
    short=2,
    foreign_per_lang=1,
    charset_pages=2,
)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crawl")
    build_crawl(out, SMALL)
    return out


def test_build_is_deterministic(crawl: Path, tmp_path: Path) -> None:
    build_crawl(tmp_path, SMALL)
    assert (tmp_path / "crawl.warc.gz").read_bytes() == (crawl / "crawl.warc.gz").read_bytes()
    assert (tmp_path / "labels.jsonl").read_bytes() == (crawl / "labels.jsonl").read_bytes()


def test_every_record_has_a_label(crawl: Path) -> None:
    labels = [json.loads(line) for line in (crawl / "labels.jsonl").read_text().splitlines()]
    with open(crawl / "crawl.warc.gz", "rb") as f:
        records = [
            (str(r.record_type), r.headers.get("WARC-Target-URI"))
            for r in ArchiveIterator(f, parse_http=False)
            if str(r.record_type) in ("response", "request")
        ]
    assert [(lb["record_type"], lb["url"]) for lb in labels] == records
    kinds = {lb["kind"] for lb in labels}
    assert {
        "good",
        "charset",
        "exact_dup",
        "near_dup",
        "far_edit",
        "spam",
        "short",
        "malformed",
        "non_html",
    } <= kinds


def test_planted_pairs_have_measured_jaccard(crawl: Path) -> None:
    labels = [json.loads(line) for line in (crawl / "labels.jsonl").read_text().splitlines()]
    by_url = {lb["url"]: lb for lb in labels}
    for lb in labels:
        if lb["kind"] in ("near_dup", "far_edit", "exact_dup"):
            original = by_url[lb["dup_of"]]["main_text"]
            assert lb["jaccard"] == pytest.approx(jaccard(original, lb["main_text"]), abs=1e-4)
    near = [lb["jaccard"] for lb in labels if lb["kind"] == "near_dup"]
    far = [lb["jaccard"] for lb in labels if lb["kind"] == "far_edit"]
    assert max(far) < 0.5 < min(near)


def test_foreign_pages_are_really_foreign(crawl: Path) -> None:
    foreign = [json.loads(line) for line in (crawl / "labels.jsonl").read_text().splitlines()]
    foreign = [lb for lb in foreign if lb["kind"] == "foreign"]
    if not Path("/usr/share/man/de").is_dir():
        assert foreign == []  # the builder says so rather than inventing text
        return
    assert {lb["lang"] for lb in foreign} <= {"de", "fr", "es", "it"}
    assert all(english_rate(lb["main_text"]) <= 0.02 for lb in foreign)


def test_strip_troff_decodes_escapes() -> None:
    src = ".\\\" comment\n.TH X 1\n.SH BESCHREIBUNG\nl\\(aqintegrit\\(`a \\fBdei\\fP caf\\['e] \\- x\n'br\\}\n"
    assert strip_troff(src) == "BESCHREIBUNG\nl'integrità dei café - x"
