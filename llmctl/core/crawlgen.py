"""The embedded raw crawl: real text wrapped into web pages inside a .warc.gz, with ground truth.

Built deterministically (seeded) from text already on the machine, so the demo and the tests need
no download and can measure the data stages against known answers:

    good        English prose (Python's documentation topics and stdlib docstrings) in HTML pages with
                the boilerplate a crawl has: navigation, cookie banner, related-links sidebar, footer
    charset     good pages served as windows-1252 with the charset declared in the HTTP header
    exact_dup   verbatim copies of good pages at mirror URLs
    near_dup    copies with a small share of words replaced (true word 5-gram Jaccard recorded)
    far_edit    copies with many words replaced: similar topic, Jaccard well below any dedup threshold
    spam        keyword-stuffed pages (repeated phrases)
    short       very short pages (error pages, stubs)
    foreign     real German, French, Spanish and Italian text: the translated man pages that man-db
                installs under /usr/share/man/{de,fr,es,it} (troff markup stripped); none if absent
    malformed   response records with broken HTTP headers or an empty body
    non_html    responses that are not HTML (image/png, application/json), request and metadata records

`labels.jsonl` beside the archive has one row per record: url, record type, kind, whether a
crawl filter should keep it, language, the duplicated url, the measured Jaccard, and the main text
of the page (what extraction should recover).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import json
import random
import re
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
FOREIGN_LANGS = ("de", "fr", "es", "it")

SITES = [
    (
        "docs.pyref.example",
        "PyRef Docs",
        ["Home", "Tutorial", "Library", "Language", "Download", "Community"],
    ),
    ("learn-code.example", "LearnCode", ["Start here", "Courses", "Articles", "Forum", "Pricing"]),
    ("devnotes.example", "DevNotes", ["Blog", "Archive", "Tags", "About", "Contact"]),
    ("manual-mirror.example", "Manual Mirror", ["Index", "Modules", "Search", "Changelog"]),
]
SPAM_KEYWORDS = [
    "cheap",
    "pills",
    "casino",
    "bonus",
    "free",
    "win",
    "best price",
    "discount",
    "buy now",
    "online",
]
SHORT_PAGES = [
    "404 Not Found. The page you requested could not be found.",
    "Loading...",
    "Access denied.",
    "Coming soon!",
    "Please enable JavaScript to view this page.",
    "Subscribe to our newsletter.",
]


@dataclass(frozen=True, kw_only=True)
class CrawlSpec:
    """How many pages of each kind to plant."""

    seed: int = 0
    max_good: int = 0  # cap on good pages (0 = every topic and docstring document)
    exact_dups: int = 30
    near_dups: int = 40  # half with ~1% of words edited (Jaccard ~0.9), half with ~3% (~0.75)
    far_edits: int = 20  # ~20% of words edited (Jaccard well below 0.5)
    spam: int = 20
    short: int = 20
    foreign_per_lang: int = 10
    charset_pages: int = 5


def word_shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams (the unit the ground-truth Jaccard is measured in)."""
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = 5) -> float:
    """True Jaccard similarity of two texts' word n-gram sets."""
    sa, sb = word_shingles(a, n), word_shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


_ACCENTS = {
    "`": "\u0300",
    "'": "\u0301",
    "^": "\u0302",
    ":": "\u0308",
    "~": "\u0303",
    ",": "\u0327",
}
_NAMED = {
    "aq": "'",
    "dq": '"',
    "em": "—",
    "en": "–",
    "hy": "-",
    "lq": "“",
    "rq": "”",
    "Fo": "«",
    "Fc": "»",
    "ss": "ß",
    "co": "©",
    "bu": "•",
    "oq": "‘",
    "cq": "’",
    "Aq": "'",
    "rs": "\\",
    "ti": "~",
}


def _troff_char(name: str) -> str:
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    return _NAMED.get(name, "")


def strip_troff(src: str) -> str:
    """Man-page troff to plain prose: drop requests and comments, decode character escapes."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'")):  # comments, and requests under the no-break control "'"
            continue
        if line.startswith("."):
            # keep the text of font macros (.B word, .I word); other requests end a paragraph or vanish
            m = re.match(r"\.(B|I|BR|IR|RB|RI|BI|IB|SH|SS)\s+(.*)", line)
            if not m:
                if line.startswith((".PP", ".LP", ".P", ".SH", ".TP", ".IP")):
                    out.append("")
                continue
            line = m.group(2).replace('"', "")
        line = re.sub(
            r"\\\*?\[([^\]]+)\]", lambda m: _troff_char(m.group(1)), line
        )  # \[xx] and \*[xx]
        line = re.sub(r"\\\*?\((..)", lambda m: _troff_char(m.group(1)), line)  # \(xx and \*(xx
        line = re.sub(r"\\f[BIRP]|\\\||\\&|\\%|\\:|\\s[-+]?\d|\\\*.|\\c", "", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


_EN_STOP = {
    "the",
    "and",
    "of",
    "to",
    "is",
    "in",
    "that",
    "for",
    "with",
    "are",
    "this",
    "be",
    "by",
    "if",
    "it",
}


def english_rate(text: str) -> float:
    """Share of words that are common English function words (partly translated pages have many)."""
    words = re.findall(r"[a-zA-Z]+", text.lower())
    return sum(w in _EN_STOP for w in words) / max(1, len(words))


def foreign_texts(per_lang: int, rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """(lang, source path, text) from the translated man pages installed on this machine."""
    for lang in FOREIGN_LANGS:
        files = sorted((MAN_ROOT / lang).glob("man*/*.gz"))
        rng.shuffle(files)
        taken = 0
        for f in files:
            try:
                text = strip_troff(gzip.decompress(f.read_bytes()).decode("utf-8"))
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            if (
                len(text.split()) < 150 or english_rate(text) > 0.02
            ):  # skip untranslated or partly translated pages
                continue
            yield lang, str(f), text[:6000]
            taken += 1
            if taken >= per_lang:
                break


def edit_words(text: str, frac: float, rng: random.Random) -> str:
    """Replace a fraction of the words (keeping line structure) with other words of the text."""
    lines = text.split("\n")
    words = text.split()
    positions = [
        (i, j)
        for i, ln in enumerate(lines)
        for j, _ in enumerate(ln.split(" "))
        if ln.split(" ")[j]
    ]
    k = max(1, round(frac * len(positions)))
    chosen = set(rng.sample(range(len(positions)), min(k, len(positions))))
    split = [ln.split(" ") for ln in lines]
    for idx in chosen:
        i, j = positions[idx]
        split[i][j] = rng.choice(words) + "s"
    return "\n".join(" ".join(ws) for ws in split)


def page_html(title: str, body: str, site: int, lang: str = "en", charset: str = "utf-8") -> str:
    """A page with boilerplate around the article."""
    domain, name, menu = SITES[site % len(SITES)]
    nav = " | ".join(f'<a href="/{m.lower().replace(" ", "-")}">{m}</a>' for m in menu)
    paras = "\n".join(
        f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in body.split("\n\n") if p.strip()
    )
    related = "".join(
        f'<li><a href="/page/{i}">{m} guide {i}</a></li>' for i, m in enumerate(menu[:4])
    )
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="{charset}"><title>{html.escape(title)} - {name}</title>'
        f'<script>window.analytics = {{"id": "UA-{site}"}}; function track(e) {{ return e; }}</script></head>\n'
        f'<body><header><div class="logo">{name}</div><nav>{nav}</nav></header>\n'
        f'<div class="cookie-banner">We use cookies to improve your experience. By continuing you agree to our cookie policy. '
        f"<button>Accept all cookies</button></div>\n"
        f"<main><article><h1>{html.escape(title)}</h1>\n{paras}\n</article></main>\n"
        f"<aside><h3>Related pages</h3><ul>{related}</ul><p>Sign up for our newsletter!</p></aside>\n"
        f'<footer><p>© 2024 {name}. All rights reserved.</p><a href="/privacy">Privacy policy</a> '
        f'<a href="/terms">Terms of use</a> <a href="/contact">Contact us</a></footer></body></html>\n'
    )


def _english_docs(max_good: int) -> list[tuple[str, str]]:
    from llmctl.stages.corpus import CorpusConfig, documents

    docs = []
    for d in documents(CorpusConfig(kinds=("topics", "docstrings"))):
        if len(d["text"].split()) >= 150:
            docs.append((d["id"].split("/", 1)[1], d["text"]))
            if max_good and len(docs) >= max_good:
                break
    return docs


def build_crawl(out_dir: Path, spec: CrawlSpec) -> dict[str, int]:
    """Write `crawl.warc.gz` and `labels.jsonl` into `out_dir`; return counts per kind."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(spec.seed)
    good = _english_docs(spec.max_good)
    records: list[dict] = []  # label rows, each with "_payload" and "_ctype" for writing

    def add(
        kind: str,
        url: str,
        title: str,
        text: str,
        keep: bool | None,
        lang: str | None,
        *,
        site: int = 0,
        charset: str = "utf-8",
        dup_of: str | None = None,
        jac: float | None = None,
        raw: bytes | None = None,
        ctype: str = "text/html",
        record_type: str = "response",
    ) -> None:
        payload = (
            raw
            if raw is not None
            else page_html(title, text, site, lang or "en", charset).encode(charset, "replace")
        )
        records.append(
            {
                "url": url,
                "record_type": record_type,
                "kind": kind,
                "keep": keep,
                "lang": lang,
                "dup_of": dup_of,
                "jaccard": jac,
                "main_text": text if raw is None else None,
                "_payload": payload,
                "_ctype": f"{ctype}; charset={charset}" if ctype == "text/html" else ctype,
            }
        )

    for i, (name, text) in enumerate(good):
        site = i % len(SITES)
        add(
            "good",
            f"https://{SITES[site][0]}/{name}",
            name.replace("/", " "),
            text,
            True,
            "en",
            site=site,
        )
    base = [r for r in records if r["kind"] == "good"]
    for r in rng.sample(base, min(spec.charset_pages, len(base))):
        # Same prose served as windows-1252 (the HTTP header declares it): must decode correctly.
        text = r["main_text"].encode("cp1252", "replace").decode("cp1252").replace("?", "'")
        add(
            "charset",
            r["url"].replace("https://", "https://latin1."),
            "cp1252 page",
            text + "\nCafé, naïve, déjà vu — «quoted».",
            True,
            "en",
            charset="windows-1252",
            site=2,
        )
    picks = rng.sample(base, min(len(base), spec.exact_dups + spec.near_dups + spec.far_edits))
    for n, r in enumerate(picks):
        mirror = r["url"].replace("https://", f"https://mirror{n % 3}.")
        if n < spec.exact_dups:
            add(
                "exact_dup",
                mirror,
                "copy",
                r["main_text"],
                False,
                "en",
                dup_of=r["url"],
                jac=1.0,
                site=(n + 1) % len(SITES),
            )
        else:
            m = n - spec.exact_dups
            frac = 0.01 if m < spec.near_dups // 2 else 0.03 if m < spec.near_dups else 0.2
            kind = "near_dup" if m < spec.near_dups else "far_edit"
            edited = edit_words(r["main_text"], frac, rng)
            jac = round(jaccard(r["main_text"], edited), 4)
            add(
                kind,
                mirror,
                "edited copy",
                edited,
                None,
                "en",
                dup_of=r["url"],
                jac=jac,
                site=(n + 2) % len(SITES),
            )
    for i in range(spec.spam):
        words = [rng.choice(SPAM_KEYWORDS) for _ in range(400)]
        text = "\n\n".join(" ".join(words[j : j + 40]) for j in range(0, 400, 40))
        add("spam", f"https://deals{i}.spam.example/offer", "Best deals", text, False, "en", site=i)
    for i in range(spec.short):
        add(
            "short",
            f"https://stub{i}.example/",
            "Notice",
            SHORT_PAGES[i % len(SHORT_PAGES)],
            False,
            "en",
            site=i,
        )
    for i, (lang, src, text) in enumerate(foreign_texts(spec.foreign_per_lang, rng)):
        add(
            "foreign",
            f"https://{lang}.handbuch.example/{Path(src).name}",
            Path(src).name,
            text,
            False,
            lang,
            site=i,
        )
    # Broken records: a garbled HTTP status line and headers, an empty body.
    add(
        "malformed",
        "https://broken.example/headers",
        "",
        "",
        False,
        None,
        raw=b"HTTP/1.1 2x0 WHAT\r\nContent-Type text/html\r\n\r\n<html><body>half a page",
        ctype="raw",
    )
    add(
        "malformed", "https://broken.example/empty", "", "", False, None, raw=b"", ctype="text/html"
    )
    add(
        "non_html",
        "https://img.example/logo.png",
        "",
        "",
        False,
        None,
        raw=b"\x89PNG\r\n\x1a\n" + bytes(range(64)),
        ctype="image/png",
    )
    add(
        "non_html",
        "https://api.example/data.json",
        "",
        "",
        False,
        None,
        raw=b'{"a": 1}',
        ctype="application/json",
    )

    order = list(range(len(records)))
    rng.shuffle(order)  # duplicates should not sit next to their originals
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with (
        open(out_dir / "crawl.warc.gz", "wb") as f,
        open(out_dir / "labels.jsonl", "w", encoding="utf-8") as lab,
    ):
        w = WARCWriter(f, gzip=True)
        for n, i in enumerate(order):
            r = records[i]
            key = f"{spec.seed}:{n}:{r['url']}".encode()
            rid = f"<urn:uuid:{uuid.UUID(hashlib.md5(key).hexdigest())}>"
            date = f"2024-01-{1 + n // 86400 % 28:02d}T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"
            whead = {"WARC-Date": date, "WARC-Record-ID": rid}
            if r["_ctype"] == "raw":
                whead["Content-Type"] = "application/http; msgtype=response"
                rec = w.create_warc_record(
                    r["url"],
                    "response",
                    payload=io.BytesIO(r["_payload"]),
                    length=len(r["_payload"]),
                    warc_headers_dict=whead,
                )
            else:
                http = StatusAndHeaders(
                    "200 OK", [("Content-Type", r["_ctype"])], protocol="HTTP/1.1"
                )
                rec = w.create_warc_record(
                    r["url"],
                    "response",
                    payload=io.BytesIO(r["_payload"]),
                    http_headers=http,
                    warc_headers_dict=whead,
                )
            if n % 50 == 0:  # a request record before some responses, as crawlers write them
                req = w.create_warc_record(
                    r["url"],
                    "request",
                    payload=io.BytesIO(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
                    warc_headers_dict={
                        "WARC-Date": date,
                        "WARC-Record-ID": rid[:-2] + "f>",
                        "Content-Type": "application/http; msgtype=request",
                    },
                )
                w.write_record(req)
                lab.write(
                    json.dumps(
                        {
                            "url": r["url"],
                            "record_type": "request",
                            "kind": "non_html",
                            "keep": False,
                        }
                    )
                    + "\n"
                )
                counts["request"] = counts.get("request", 0) + 1
            w.write_record(rec)
            lab.write(
                json.dumps(
                    {k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False
                )
                + "\n"
            )
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    return counts
