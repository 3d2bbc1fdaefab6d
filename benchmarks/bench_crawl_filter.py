"""crawl-filter: documents/s with 2 workers on a generated crawl, extractor speed and quality, the
WARC reader, and datatrove's equivalent pipeline if it is installed.

Input: N pages (default 4000; 600 with --quick) in two .warc.gz files. 80% are English articles of
six real paragraphs (Python's documentation topics, each paragraph from a different topic)
inside the boilerplate a crawl has (navigation, cookie banner, related-posts sidebar, newsletter
form, share bar, footer), half in semantic HTML5 (<main>, <article>), half in <div> layout; the
rest are keyword-stuffed spam, short stubs, foreign-language pages (real German, French, Spanish
and Italian from the OS's translated man pages), blocklisted URLs and non-HTML responses.

Measurements (wall time on a shared 2-core machine: ratios measured in one run matter, not
absolutes; CPU ms per document, all processes together, is less sensitive to other load):
    extract    resiliparse vs trafilatura on the same 200 article pages, one process, interleaved:
               pages/s, share of article paragraphs recovered, share of boilerplate phrases left
               in the extract (before any filter), per layout
    read       WARC response records/s: llmctl's reader (its own gunzip, so truncation is
               reported, then fastwarc) vs fastwarc reading the gzip itself
    pipeline   `crawl_filter.run` end to end (read, extract, lid.176, URL, Gopher, C4, write):
               documents/s with --workers 2 and 1, resiliparse and trafilatura
    datatrove  WarcReader -> URLFilter -> Trafilatura -> LanguageFilter(en, 0.65, lid.176) ->
               GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter -> JsonlWriter
               (whitespace words, as llmctl counts them: no spaCy), 2 tasks on 2 workers, run under --datatrove-python (a separate venv: datatrove is
               not an llmctl dependency); skipped with a note when absent. The ratio llmctl /
               datatrove is reported for the like-for-like pipeline (trafilatura both sides) and
               for each tool's default extractor.

    python benchmarks/bench_crawl_filter.py [--quick] [--pages N] [--json PATH] [--datatrove-python PY]
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # puts the repo root on sys.path

sys.path.insert(0, str(_common.REPO / "tests" / "stages"))  # the page builder the tests use

FOREIGN = ("de", "fr", "es", "it")
SPAM_WORDS = ["cheap", "pills", "best", "price", "buy", "now", "free", "casino", "bonus", "online"]


# -- input ---------------------------------------------------------------------------------------


def make_crawl(root: Path, n_pages: int, seed: int = 0) -> dict:
    """Write root/crawl/part-{0,1}.warc.gz; return the article pages (html, paragraphs, layout)."""
    from crawl_fixtures import english_articles, foreign_paragraphs, html_page

    from llmctl.core.warc import Page, write_warc

    rng = random.Random(seed)
    arts = english_articles()
    foreign = {lang: foreign_paragraphs(lang, 60) for lang in FOREIGN}
    foreign = {k: v for k, v in foreign.items() if v}
    pages: list = []
    articles: list[tuple[str, list[str], bool]] = []
    kinds: dict[str, int] = {}
    for i in range(n_pages):
        r = rng.random()
        kind = (
            "article" if r < 0.80 else "spam" if r < 0.88 else "short" if r < 0.92
            else "foreign" if r < 0.96 and foreign else "blocked" if r < 0.98 else "non_html"
        )  # fmt: skip
        kinds[kind] = kinds.get(kind, 0) + 1
        semantic = i % 2 == 0
        url = f"https://site{i % 17}.example/{kind}/{i}"
        if kind in ("article", "blocked"):
            paras = [arts[(i * 7 + j * 11) % len(arts)][1][(i + j) % 3] for j in range(6)]
            html = html_page(f"Article {i}", paras, semantic=semantic)
            if kind == "blocked":
                url = f"https://casino-{i}.example/free-casino-bonus"
            else:
                articles.append((html, paras, semantic))
        elif kind == "spam":
            html = html_page(
                "Deals",
                [" ".join(rng.choice(SPAM_WORDS) for _ in range(40)) + "." for _ in range(8)],
            )
        elif kind == "short":
            html = html_page("Notice", ["Coming soon."], semantic=semantic)
        elif kind == "foreign":
            lang = sorted(foreign)[i % len(foreign)]
            ps = foreign[lang]
            html = html_page("Handbuch", [ps[(i + j) % len(ps)] for j in range(6)], lang=lang)
        else:
            pages.append(
                Page(url, b"\x89PNG\r\n\x1a\n" + bytes(range(64)), content_type="image/png")
            )
            continue
        pages.append(Page(url, html.encode()))
    crawl = root / "crawl"
    crawl.mkdir(parents=True)
    half = len(pages) // 2
    write_warc(crawl / "part-0.warc.gz", pages[:half])
    write_warc(crawl / "part-1.warc.gz", pages[half:])
    return {"kinds": kinds, "articles": articles, "files": sorted(crawl.glob("*.warc.gz"))}


# -- measurements --------------------------------------------------------------------------------


def bench_extract(articles: list, repeats: int) -> list[dict]:
    from crawl_fixtures import BOILERPLATE

    from llmctl.core.warc import extract_text

    sample = articles[:200]
    fns = {
        name: (lambda name=name: [extract_text(h, name) for h, _, _ in sample])
        for name in ("resiliparse", "trafilatura")
    }
    times = _common.interleaved(fns, repeats=repeats)
    rows = []
    for name in fns:
        outs = [" ".join(t.split()) for t in fns[name]()]
        row = {"extractor": name, "pages/s": len(sample) / _common.median(times[name])}
        for layout, sem in (("semantic", True), ("div", False)):
            idx = [i for i, (_, _, s) in enumerate(sample) if s == sem]
            rec = [sum(p in outs[i] for p in sample[i][1]) / len(sample[i][1]) for i in idx]
            leak = [sum(b in outs[i] for b in BOILERPLATE) / len(BOILERPLATE) for i in idx]
            row[f"recall {layout}"] = sum(rec) / max(1, len(rec))
            row[f"boilerplate {layout}"] = sum(leak) / max(1, len(leak))
        rows.append(row)
    return rows


def bench_read(files: list[Path], repeats: int) -> dict:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    from llmctl.core.warc import WarcReport, read_warc

    def ours() -> int:
        return sum(len(r.body) >= 0 for f in files for r in read_warc(f, WarcReport()))

    def native() -> int:
        n = 0
        for f in files:
            with open(f, "rb") as fh:
                for r in ArchiveIterator(fh, record_types=WarcRecordType.response, parse_http=True):
                    r.reader.read()
                    n += 1
        return n

    n = ours()
    times = _common.interleaved({"llmctl": ours, "fastwarc": native}, repeats=repeats * 3)
    return {
        "records": n,
        "llmctl rec/s": n / _common.median(times["llmctl"]),
        "fastwarc rec/s": n / _common.median(times["fastwarc"]),
    }


def bench_pipeline(files: list[Path], root: Path, repeats: int) -> list[dict]:
    from llmctl.stages import crawl_filter

    rows = []
    for extractor, workers in (("resiliparse", 2), ("resiliparse", 1), ("trafilatura", 2)):
        secs, cpus, m = [], [], None
        for r in range(repeats):
            out = root / f"out-{extractor}-{workers}-{r}"
            cfg = crawl_filter.CrawlFilterConfig(workers=workers, extractor=extractor)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            m = crawl_filter.run([str(f) for f in files], out, cfg)
            secs.append(time.perf_counter() - t0)
            cpus.append(_cpu_seconds() - c0)  # parent + reaped workers
        assert m is not None
        s, n = _common.median(secs), m.counts["documents"]
        rows.append(
            {
                "system": "llmctl",
                "extractor": extractor,
                "workers": workers,
                "docs": n,
                "kept": m.counts["kept"],
                "seconds": s,
                "docs/s": n / s,
                "cpu ms/doc": 1000 * _common.median(cpus) / n,
            }
        )
    return rows


def _cpu_seconds() -> float:
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# -- datatrove (runs in its own interpreter) -----------------------------------------------------


def run_datatrove(root: Path, workers: int) -> dict:
    """The FineWeb-style datatrove pipeline on root/crawl; prints nothing, returns counts."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
        URLFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.lid import FT176LID
    from datatrove.utils.word_tokenizers import WordTokenizer

    lid_path = root / "lid.176.ftz"

    class Whitespace(WordTokenizer):  # what llmctl's filters count as words and sentences
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    ws = Whitespace()

    class LocalLID(FT176LID):  # lid.176.ftz from disk, as llmctl uses it (no download)
        @property
        def model(self):  # noqa: ANN202
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(str(lid_path))
            return self._model

    class LocalLanguageFilter(LanguageFilter):
        def __init__(self) -> None:
            super().__init__(languages=["en"], language_threshold=0.65)
            self.model = LocalLID(["en"])

    class LocalURLFilter(URLFilter):  # llmctl's default banned words; no list download
        def __init__(self) -> None:
            lines = (_common.REPO / "llmctl/assets/url_blocklist.txt").read_text().splitlines()
            words = [ln[5:].strip() for ln in lines if ln.startswith("word:") and ln[5:].strip()]
            super().__init__(banned_words=words, use_integrated_lists=False)
            from tldextract import TLDExtract

            self.tldextractor = TLDExtract(suffix_list_urls=())

    out = root / "out-datatrove"
    LocalPipelineExecutor(
        pipeline=[
            WarcReader(str(root / "crawl"), glob_pattern="*.warc.gz"),
            LocalURLFilter(),
            Trafilatura(favour_precision=True),
            LocalLanguageFilter(),
            GopherRepetitionFilter(language=ws),
            GopherQualityFilter(language=ws),
            C4QualityFilter(filter_no_terminal_punct=True, language=ws),
            JsonlWriter(str(out / "docs")),
        ],
        tasks=2,
        workers=workers,
        logging_dir=str(out / "logs"),
    ).run()
    import gzip

    kept = 0
    for f in (out / "docs").glob("*.jsonl.gz"):
        with gzip.open(f, "rt") as fh:
            kept += sum(1 for _ in fh)
    return {"kept": kept}


def datatrove_python(arg: str | None) -> str | None:
    candidates = [arg] if arg else [sys.executable, "/tmp/venv-dt/bin/python"]
    probe = (
        "import trafilatura, fasttext, ahocorasick, tldextract; "
        "from datatrove.pipeline.readers import WarcReader"
    )
    for py in candidates:
        if py and Path(py).exists():
            r = subprocess.run([py, "-c", probe], capture_output=True, check=False)
            if r.returncode == 0:
                return py
    return None


def call_datatrove(py: str, root: Path, n_docs: int, repeats: int) -> dict | None:
    from llmctl.core.classify import default_lid_path

    (root / "lid.176.ftz").write_bytes(default_lid_path().read_bytes())
    secs, kept = [], 0
    for _ in range(repeats):
        out = root / "out-datatrove"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        p = subprocess.run(
            [py, __file__, "--worker", "datatrove", "--data", str(root)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(_common.REPO / "benchmarks")},
            check=False,
            timeout=900,
        )
        secs.append(time.perf_counter() - t0)
        if p.returncode != 0:
            print(f"[datatrove] failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
            return None
        kept = json.loads(p.stdout.strip().splitlines()[-1])["kept"]
    s = _common.median(secs)
    return {
        "system": "datatrove",
        "extractor": "trafilatura",
        "workers": 2,
        "docs": n_docs,
        "kept": kept,
        "seconds": s,
        "docs/s": n_docs / s,
        "cpu ms/doc": None,  # its Trafilatura runs in sandbox processes rusage does not see
    }


# -- driver ----------------------------------------------------------------------------------------


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, help="pages in the crawl (default 4000; 600 with --quick)")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (default 3; 1 quick)")
    p.add_argument("--datatrove-python", help="interpreter with datatrove[processing] installed")
    p.add_argument("--worker", help=__import__("argparse").SUPPRESS)
    p.add_argument("--data", help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.worker == "datatrove":
        print(json.dumps(run_datatrove(Path(args.data), workers=2)))
        return
    n_pages = args.pages or (600 if args.quick else 4000)
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-crawl-filter-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        crawl = make_crawl(root, n_pages)
        size = sum(f.stat().st_size for f in crawl["files"])
        print(
            f"crawl: {n_pages} pages {crawl['kinds']}, {size / 1e6:.1f} MB gzip, "
            f"built in {time.perf_counter() - t0:.1f} s\n"
        )
        results["extract"] = bench_extract(crawl["articles"], repeats)
        print("extraction (one process, 200 article pages; recall = article paragraphs found, "
              "boilerplate = share of boilerplate phrases in the extract):")  # fmt: skip
        print(_common.table(results["extract"]) + "\n")
        results["read"] = bench_read(crawl["files"], repeats)
        print("WARC reading (response records/s):")
        print(_common.table([results["read"]]) + "\n")
        rows = bench_pipeline(crawl["files"], root, repeats)
        py = datatrove_python(args.datatrove_python)
        if py is None:
            print(
                "note: datatrove not found (pass --datatrove-python PY, e.g. a venv with "
                "`pip install datatrove[processing] lxml_html_clean`); its row is skipped\n"
            )
        else:
            dt = call_datatrove(py, root, rows[0]["docs"], repeats)
            if dt:
                rows.append(dt)
                like = next(
                    r for r in rows if r["extractor"] == "trafilatura" and r["system"] == "llmctl"
                )
                rows[0]["vs datatrove"] = rows[0]["docs/s"] / dt["docs/s"]
                like["vs datatrove"] = like["docs/s"] / dt["docs/s"]
        results["pipeline"] = rows
        print(
            "pipeline, end to end (docs/s = documents in / wall seconds, pool start included; "
            f"cpu = all processes; load average before: {os.getloadavg()[0]:.1f}):"
        )
        print(_common.table(rows) + "\n")
        ext = {r["extractor"]: r["pages/s"] for r in results["extract"]}
        results["ratios"] = {"resiliparse/trafilatura": ext["resiliparse"] / ext["trafilatura"]}
        print(
            f"ratio resiliparse / trafilatura, pages/s: {results['ratios']['resiliparse/trafilatura']:.2f}"
        )
        if "vs datatrove" in rows[0]:
            like = next(r for r in rows if "vs datatrove" in r and r["extractor"] == "trafilatura")
            results["ratios"] |= {
                "llmctl/datatrove": rows[0]["vs datatrove"],
                "llmctl/datatrove, trafilatura both": like["vs datatrove"],
            }
            print(
                f"ratio llmctl / datatrove, docs/s with 2 workers: {rows[0]['vs datatrove']:.2f} "
                f"(each tool's default extractor), {like['vs datatrove']:.2f} (trafilatura both; "
                "target >= 1.0)"
            )
    _common.write_json(args.json, "bench_crawl_filter", args, results)


if __name__ == "__main__":
    main()
