"""Real text wrapped in web pages, for crawl-filter tests and its benchmark.

English text comes from the running Python's `pydoc_data.topics` (the reference prose `help()`
shows); non-English text from the translated man pages the OS ships under /usr/share/man/<lang>/
(Debian's manpages-de/-fr/... and the translations that man-db, dpkg and apt carry), with the roff
markup stripped. Pages get what a real crawl has around the article: navigation, a cookie banner,
a sidebar, a share bar and a footer (`BOILERPLATE` lists their phrases), in either semantic HTML5
(<main>, <article>) or plain <div> layout.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")

BOILERPLATE = (
    "About us",
    "We use cookies to improve your experience on our site and to show you relevant content.",
    "Accept all cookies",
    "Manage preferences",
    "Related posts",
    "Subscribe to our newsletter for weekly updates",
    "Share this article",
    "All rights reserved",
    "Privacy Policy",
    "Terms of Use",
)


@lru_cache(maxsize=1)
def english_articles() -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of prose from pydoc_data.topics: paragraphs of >= 12 words that end a
    sentence and hold no code (no braces, no interactive prompts), articles with >= 3 of them."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        paras = []
        for p in re.split(r"\n\s*\n", topics[name]):
            p = " ".join(p.split())
            if len(p.split()) >= 12 and p.endswith(".") and not re.search(r"[{}]|>>>|::=", p):
                paras.append(p)
        if len(paras) >= 3:
            out.append((name.replace("-", " ").title(), paras))
    return out


def _roff_to_paragraphs(data: bytes) -> list[str]:
    text = data.decode("utf-8", "replace")
    paras, cur = [], []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            m = re.match(r"[.'](\w+)\s*(.*)", line)
            if m and m.group(1) in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM"):
                cur.append(m.group(2).replace('"', ""))
            elif cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(line)
    if cur:
        paras.append(" ".join(cur))
    out = []
    for p in paras:
        p = re.sub(r"\\\[u([0-9A-Fa-f]{4})\]", lambda m: chr(int(m.group(1), 16)), p)
        p = p.replace("\\(aq", "'").replace("\\(dq", '"').replace("\\-", "-").replace("\\&", "")
        p = re.sub(r"\\f(\[[^\]]*\]|\(..|.)|\\\(..|\\\[[^\]]*\]|\\.", "", p)
        p = " ".join(p.split())
        if len(p.split()) >= 12:
            out.append(p)
    return out


@lru_cache(maxsize=8)
def foreign_paragraphs(lang: str, n: int = 40) -> list[str]:
    """Up to `n` paragraphs of real text in `lang` (de, fr, es, ...) from translated man pages;
    empty when the OS ships none."""
    out: list[str] = []
    for f in sorted((MAN_ROOT / lang).glob("man*/*.gz")):
        try:
            out += _roff_to_paragraphs(gzip.decompress(f.read_bytes()))
        except (OSError, EOFError):
            continue
        if len(out) >= n:
            break
    return out[:n]


def html_page(
    title: str,
    paragraphs: list[str],
    *,
    lang: str = "en",
    semantic: bool = True,
    charset: str | None = "utf-8",
) -> str:
    """An article page with boilerplate around it; `charset` (if any) goes in a <meta> tag."""
    meta = f'<meta charset="{charset}">' if charset else ""
    body = "".join(f"<p>{html.escape(p)}</p>\n" for p in paragraphs)
    related = "".join(
        f'<li><a href="/post/{i}">Another interesting article number {i}</a></li>' for i in range(6)
    )
    nav = (
        '<ul class="menu"><li><a href="/">Home</a></li><li><a href="/about">About us</a></li>'
        '<li><a href="/blog">Blog</a></li><li><a href="/contact">Contact</a></li></ul>'
    )
    cookie = (
        f'<div id="cookie-banner" class="cookie-consent"><p>{BOILERPLATE[1]}</p>'
        '<button>Accept all cookies</button><a href="/prefs">Manage preferences</a></div>'
    )
    side = (
        f"<h3>Related posts</h3><ul>{related}</ul><h3>Newsletter</h3>"
        "<p>Subscribe to our newsletter for weekly updates</p>"
        '<form><input type="email" name="email"><button>Sign up</button></form>'
    )
    share = '<div class="share">Share this article: Twitter | Facebook | LinkedIn</div>'
    foot = (
        "<p>&copy; 2024 Example Media. All rights reserved.</p><ul>"
        '<li><a href="/privacy">Privacy Policy</a></li><li><a href="/terms">Terms of Use</a></li></ul>'
    )
    head = (
        f"<head>{meta}<title>{html.escape(title)} | Example</title>"
        "<script>var analytics = {id: 42};</script><style>body { color: #222 }</style></head>"
    )
    if semantic:
        return (
            f'<!DOCTYPE html><html lang="{lang}">{head}<body><header><nav>{nav}</nav></header>'
            f"{cookie}<main><article><h1>{html.escape(title)}</h1>{body}</article>"
            f'<aside class="sidebar">{side}</aside></main>{share}<footer>{foot}</footer></body></html>'
        )
    return (
        f'<html lang="{lang}">{head}<body><div id="top"><div class="nav">{nav}</div></div>{cookie}'
        f'<div id="wrap"><div class="left">{side}</div><div class="content">'
        f"<h2>{html.escape(title)}</h2>{body}</div></div>{share}"
        f'<div id="bottom">{foot}</div></body></html>'
    )
