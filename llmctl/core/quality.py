"""Heuristic quality filters for web text, after the published rule sets.

Each filter is a frozen dataclass whose fields are its thresholds (the defaults are the papers'),
with two methods: `measure(text)` returns the numbers its rules look at, and `rules()` says how
each number is judged. `check(filter, measures)` returns None (keep) or a `Drop` naming the first
rule that failed and the measured value. Keeping measuring and judging apart lets
`crawl-filter --sweep` re-judge measured documents at other thresholds without measuring again.

* `GopherQuality`: Rae et al. 2021 ("Scaling Language Models: Methods, Analysis & Insights from
  Training Gopher"), appendix A.1.1, quality filter.
* `GopherRepetition`: the same appendix, Table A1 (repetition removal).
* `C4`: Raffel et al. 2020 ("Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer"), section 2.2. Unlike the others it also rewrites the text: it removes lines.
* `UrlBlocklist`: domains and URL words from a list (the idea of C4's and RefinedWeb's URL
  filters; our list format is described in `llmctl/assets/url_blocklist.txt`).

Where the papers leave a definition open we follow datatrove's reading (huggingface/datatrove,
pipeline/filters/gopher_*.py and c4_filters.py) unless noted: words are whitespace tokens with
punctuation stripped from their ends; a "bullet" line starts with one of `BULLETS`; sentences are
counted as runs of terminal punctuation followed by a space or the end (no NLTK). Departures from
datatrove: the stop-word rule counts occurrences like datatrove, but the n-gram character
fractions are taken over word characters (numerator and denominator alike) rather than over
`len(text)`; a top n-gram only counts when it occurs at least twice (so a 4-word document is not
"100% one 4-gram"); and duplicate n-grams cover every occurrence of a repeated n-gram, overlaps
counted once, as the Gopher paper describes (datatrove counts only the repeats).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal
from urllib.parse import urlsplit

import numpy as np

from llmctl.core.errors import InputError

Measures = dict[str, float]
_PUNCT = (
    string.punctuation + "\u2026\u00ab\u00bb\u201c\u201d\u2018\u2019\u2014\u2013\u00b7\u00bf\u00a1"
)
BULLETS = ("\u2022", "\u2023", "\u25e6", "\u25aa", "\u25cf", "\u2043", "-", "*")
ELLIPSES = ("...", "\u2026")
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_ALPHA_TOKEN = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace token holding at least one letter
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Rule:
    """One check of a filter: keep when `measure` >= threshold ("min") or <= threshold ("max")."""

    name: str
    measure: str
    kind: Literal["min", "max"]
    threshold: float
    sweep: bool = True  # False for yes/no checks, where other thresholds mean nothing

    def passes(self, value: float) -> bool:
        """Whether a measured value keeps the document."""
        return value >= self.threshold if self.kind == "min" else value <= self.threshold


@dataclass(frozen=True)
class Drop:
    """Why a document was dropped: filter, rule, measured value and a readable note."""

    reason: str
    rule: str
    value: float | None
    detail: str = ""


def check(name: str, rules: list[Rule], m: Measures) -> Drop | None:
    """The first failed rule as a Drop, or None when all pass."""
    for r in rules:
        v = m[r.measure]
        if not r.passes(v):
            op = "<" if r.kind == "min" else ">"
            return Drop(name, r.name, float(v), f"{r.measure} {v:.4g} {op} {r.threshold:g}")
    return None


def words(text: str) -> list[str]:
    """Lower-cased whitespace tokens with punctuation stripped from their ends; empty ones dropped."""
    out = []
    for t in text.lower().split():
        w = t.strip(_PUNCT)
        if w:
            out.append(w)
    return out


# -- Gopher quality -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GopherQuality:
    """Gopher quality filter (Rae et al. 2021, A.1.1); the defaults are the paper's."""

    name: ClassVar[str] = "gopher_quality"
    min_words: int = 50  # fewer words: too short
    max_words: int = 100_000  # more words: not a normal document
    min_mean_word_length: float = 3.0  # mean characters per word
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' per word, and ellipses per word (the larger counts)
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of tokens holding at least one letter
    min_stop_words: int = 2  # occurrences of the, be, to, of, and, that, have, with

    def rules(self) -> list[Rule]:
        """The rules, in the order they are checked."""
        return [
            Rule("min_words", "word_count", "min", self.min_words),
            Rule("max_words", "word_count", "max", self.max_words),
            Rule("min_mean_word_length", "mean_word_length", "min", self.min_mean_word_length),
            Rule("max_mean_word_length", "mean_word_length", "max", self.max_mean_word_length),
            Rule("max_symbol_word_ratio", "symbol_word_ratio", "max", self.max_symbol_word_ratio),
            Rule("max_bullet_lines", "bullet_lines", "max", self.max_bullet_lines),
            Rule("max_ellipsis_lines", "ellipsis_lines", "max", self.max_ellipsis_lines),
            Rule("min_alpha_words", "alpha_words", "min", self.min_alpha_words),
            Rule("min_stop_words", "stop_words", "min", self.min_stop_words),
        ]

    def measure(self, text: str) -> Measures:
        """Word count, mean word length, symbol ratio, bullet/ellipsis lines, letters, stop words."""
        ws = words(text)
        n = len(ws)
        tokens = len(text.split())
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        n_lines = max(1, len(lines))
        symbols = max(text.count("#"), sum(text.count(e) for e in ELLIPSES))
        return {
            "word_count": n,
            "mean_word_length": sum(map(len, ws)) / n if n else 0.0,
            "symbol_word_ratio": symbols / max(1, n),
            "bullet_lines": sum(line.startswith(BULLETS) for line in lines) / n_lines,
            "ellipsis_lines": sum(line.endswith(ELLIPSES) for line in lines) / n_lines,
            "alpha_words": len(_ALPHA_TOKEN.findall(text)) / tokens if tokens else 0.0,
            "stop_words": sum(w in GOPHER_STOP_WORDS for w in ws),
        }


# -- Gopher repetition ----------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_P = np.uint64(0x100000001B3)  # FNV prime: multiplier of the polynomial n-gram hash


@dataclass(frozen=True, kw_only=True)
class GopherRepetition:
    """Gopher repetition filter (Rae et al. 2021, A.1.1 and Table A1); defaults from Table A1."""

    name: ClassVar[str] = "gopher_repetition"
    max_dup_line_frac: float = 0.30  # duplicate lines / lines
    max_dup_para_frac: float = 0.30  # duplicate paragraphs / paragraphs
    max_dup_line_char_frac: float = 0.20  # characters in duplicate lines / characters
    max_dup_para_char_frac: float = 0.20  # characters in duplicate paragraphs / characters
    # (n, max fraction of word characters in the most frequent n-gram)
    top_ngram: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    # (n, max fraction of word characters inside n-grams that occur more than once)
    dup_ngram: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    )  # fmt: skip

    def __post_init__(self) -> None:
        # TOML gives lists of lists; keep tuples so the config stays hashable and comparable.
        object.__setattr__(self, "top_ngram", tuple((int(n), float(f)) for n, f in self.top_ngram))
        object.__setattr__(self, "dup_ngram", tuple((int(n), float(f)) for n, f in self.dup_ngram))

    def rules(self) -> list[Rule]:
        """The rules, in the order they are checked."""
        out = [
            Rule("max_dup_line_frac", "dup_line_frac", "max", self.max_dup_line_frac),
            Rule("max_dup_para_frac", "dup_para_frac", "max", self.max_dup_para_frac),
            Rule(
                "max_dup_line_char_frac", "dup_line_char_frac", "max", self.max_dup_line_char_frac
            ),
            Rule(
                "max_dup_para_char_frac", "dup_para_char_frac", "max", self.max_dup_para_char_frac
            ),
        ]
        out += [Rule(f"max_top_{n}gram", f"top_{n}gram_frac", "max", f) for n, f in self.top_ngram]
        out += [Rule(f"max_dup_{n}gram", f"dup_{n}gram_frac", "max", f) for n, f in self.dup_ngram]
        return out

    def measure(self, text: str) -> Measures:
        """Duplicate line/paragraph fractions (by count and by characters) and n-gram fractions."""
        m: Measures = {}
        total = max(1, len(text))
        paras = [p.strip() for p in _PARAGRAPH_SPLIT.split(text.strip()) if p.strip()]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        for key, parts in (("para", paras), ("line", lines)):
            dups, dup_chars = _duplicates(parts)
            m[f"dup_{key}_frac"] = dups / len(parts) if parts else 0.0
            m[f"dup_{key}_char_frac"] = dup_chars / total
        ids, lengths = _word_ids(words(text))
        chars = max(1, int(lengths.sum()))
        starts = np.concatenate(([0], np.cumsum(lengths)))
        for n, _ in self.top_ngram:
            m[f"top_{n}gram_frac"] = _top_ngram_chars(ids, starts, n) / chars
        for n, _ in self.dup_ngram:
            m[f"dup_{n}gram_frac"] = _dup_ngram_chars(ids, lengths, n) / chars
        return m


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """Elements equal to an earlier one: how many, and their characters."""
    seen: set[str] = set()
    n = chars = 0
    for p in parts:
        if p in seen:
            n += 1
            chars += len(p)
        else:
            seen.add(p)
    return n, chars


def _word_ids(ws: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each word as a well-mixed 64-bit id (splitmix64 of its first-seen index), and its length."""
    index: dict[str, int] = {}
    raw = np.fromiter((index.setdefault(w, len(index)) for w in ws), np.uint64, len(ws))
    with np.errstate(over="ignore"):
        z = raw + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z & _MASK64, np.fromiter(map(len, ws), np.int64, len(ws))


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-gram (mod 2**64): one value per start position."""
    h = ids[: len(ids) - n + 1].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h = h * _P + ids[k : len(ids) - n + 1 + k]
    return h


def _top_ngram_chars(ids: np.ndarray, starts: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram (count x its length), if it repeats."""
    if len(ids) < n:
        return 0
    h = _ngram_hashes(ids, n)
    _, first, counts = np.unique(h, return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0
    pos = first[counts == top]
    return int(top * (starts[pos + n] - starts[pos]).max())  # ties: the longest n-gram


def _dup_ngram_chars(ids: np.ndarray, lengths: np.ndarray, n: int) -> int:
    """Characters of words inside any occurrence of an n-gram that occurs more than once."""
    if len(ids) < n:
        return 0
    h = _ngram_hashes(ids, n)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    dup_starts = np.flatnonzero(counts[inverse] > 1)
    if len(dup_starts) == 0:
        return 0
    cover = np.zeros(len(ids) + 1, np.int64)  # +1 at each start, -1 past each end: a sweep line
    np.add.at(cover, dup_starts, 1)
    np.add.at(cover, dup_starts + n, -1)
    return int(lengths[np.cumsum(cover[:-1]) > 0].sum())


# -- C4 -------------------------------------------------------------------------------------------

_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")
_POLICY = (
    "terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
    "use cookies",
)  # fmt: skip
_CITATION = re.compile(r"\[\d+\]|\[citation needed\]|\[edit\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")


@dataclass(frozen=True, kw_only=True)
class C4:
    """C4 rules (Raffel et al. 2020, 2.2): line removal, then page-level checks; paper defaults."""

    name: ClassVar[str] = "c4"
    min_words_per_line: int = 3  # shorter lines are removed
    min_sentences: int = 5  # pages with fewer sentences (after line removal) are dropped
    terminal_punct: bool = True  # remove lines not ending in . ! ? or a closing quote
    javascript: bool = True  # remove lines mentioning "javascript"
    policy: bool = True  # remove lines with "terms of use", "privacy policy", cookie notices
    lorem_ipsum: bool = True  # drop pages containing "lorem ipsum"
    curly_bracket: bool = True  # drop pages containing "{" (code)
    citations: bool = True  # strip Wikipedia-style markers: [1], [citation needed], [edit]
    max_word_length: int = 1000  # remove lines holding a longer "word" (datatrove's guard)

    def rules(self) -> list[Rule]:
        """The page-level rules, in the order they are checked."""
        out = []
        if self.lorem_ipsum:
            out.append(Rule("lorem_ipsum", "lorem_ipsum", "max", 0, sweep=False))
        if self.curly_bracket:
            out.append(Rule("curly_bracket", "curly_bracket", "max", 0, sweep=False))
        out.append(Rule("no_lines_left", "lines_kept", "min", 1, sweep=False))
        out.append(Rule("min_sentences", "sentences", "min", self.min_sentences))
        return out

    def clean(self, text: str) -> tuple[str, Measures, Counter]:
        """Remove lines by the line rules and measure the page.

        Returns:
            (cleaned text, measures, removed) where `removed` counts, per line rule,
            "<rule>:lines" and "<rule>:bytes".
        """
        lower = text.lower()
        m: Measures = {
            "lorem_ipsum": float("lorem ipsum" in lower),
            "curly_bracket": float("{" in text),
        }
        kept: list[str] = []
        removed: Counter = Counter()
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if self.citations:
                line = _CITATION.sub("", line).strip()
            why = self._line_rule(line)
            if why:
                removed[f"{why}:lines"] += 1
                removed[f"{why}:bytes"] += len(raw.encode("utf-8", "replace"))
            else:
                kept.append(line)
        out = "\n".join(kept)
        m["lines_kept"] = len(kept)
        m["sentences"] = len(_SENTENCE_END.findall(out))
        return out, m, removed

    def _line_rule(self, line: str) -> str | None:
        ws = line.split()
        if any(len(w) > self.max_word_length for w in ws):
            return "long_word"
        if len(ws) < self.min_words_per_line:
            return "short_line"
        low = line.lower()
        if self.javascript and "javascript" in low:
            return "javascript"
        if self.policy and any(p in low for p in _POLICY):
            return "policy"
        if self.terminal_punct and (not line.endswith(_TERMINAL) or line.endswith(ELLIPSES)):
            return "no_terminal_punct"
        return None


# -- URL blocklist --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocklist:
    """Blocked domains (each blocks its subdomains too) and banned URL words."""

    domains: frozenset[str] = field(default_factory=frozenset)
    words: frozenset[str] = field(default_factory=frozenset)

    def match(self, url: str | None) -> str | None:
        """What blocks `url` ("domain example.com" / "word casino"), or None."""
        if not url:
            return None
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        parts = host.split(".")
        for i in range(len(parts) - 1):
            d = ".".join(parts[i:])
            if d in self.domains:
                return f"domain {d}"
        for w in re.split(r"[^a-z0-9]+", url.lower()):
            if w in self.words:
                return f"word {w}"
        return None


DEFAULT_BLOCKLIST = "url_blocklist.txt"


@lru_cache(maxsize=4)
def load_blocklist(path: str | None) -> Blocklist:
    """Read a blocklist file (None: the small list shipped in llmctl/assets/).

    Format: one entry per line; `#` starts a comment; `word:TOKEN` bans a URL word; any other
    entry is a domain (a leading `domain:` is allowed).

    Raises:
        InputError: The file does not exist or is not UTF-8 text.
    """
    try:
        if path is None:
            text = (resources.files("llmctl") / "assets" / DEFAULT_BLOCKLIST).read_text("utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read the URL blocklist {path}: {e}", "check the --url-blocklist path"
        ) from None
    domains, ws = set(), set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if entry.startswith("word:"):
            ws.add(entry[5:].strip())
        else:
            domains.add(entry.removeprefix("domain:").strip().removeprefix("www."))
    return Blocklist(frozenset(domains), frozenset(ws))


@dataclass(frozen=True, kw_only=True)
class UrlBlocklist:
    """Drop documents whose URL is on a blocked domain or holds a banned word."""

    name: ClassVar[str] = "url_blocklist"
    path: str | None = None  # blocklist file; None = llmctl/assets/url_blocklist.txt

    def rules(self) -> list[Rule]:
        """One yes/no rule."""
        return [Rule("blocked", "blocked", "max", 0, sweep=False)]

    def measure_url(self, url: str | None) -> tuple[Measures, str]:
        """{"blocked": 0 or 1} and what matched."""
        hit = load_blocklist(self.path).match(url)
        return {"blocked": float(hit is not None)}, hit or ""
