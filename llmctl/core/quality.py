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


@lru_cache(maxsize=4)
def words(text: str) -> tuple[str, ...]:
    """Lower-cased whitespace tokens with punctuation stripped from their ends; empty ones dropped.

    Cached for the last few texts: both Gopher filters split the same document.
    """
    p = _PUNCT
    return tuple(w for w in (t.strip(p) for t in text.lower().split()) if w)


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
            "stop_words": sum(map(GOPHER_STOP_WORDS.__contains__, ws)),
        }


# -- Gopher repetition ----------------------------------------------------------------------------

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
        ws = words(text)
        lengths = np.fromiter(map(len, ws), np.int64, len(ws))
        chars = max(1, int(lengths.sum()))
        top = {n for n, _ in self.top_ngram}
        dup = {n for n, _ in self.dup_ngram}
        found = _ngram_chars(_word_ids(ws), lengths, top, dup)
        m.update({f"top_{n}gram_frac": found[("top", n)] / chars for n in sorted(top)})
        m.update({f"dup_{n}gram_frac": found[("dup", n)] / chars for n in sorted(dup)})
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


def _word_ids(ws: tuple[str, ...]) -> np.ndarray:
    """Each word as a 64-bit id: Python's string hash (SipHash), stable within a process, which
    is all that comparing n-grams of one document needs."""
    return np.fromiter(map(hash, ws), np.int64, len(ws)).view(np.uint64)


def _ngram_chars(
    ids: np.ndarray, lengths: np.ndarray, top: set[int], dup: set[int]
) -> dict[tuple[str, int], int]:
    """Word characters covered, per n, by the most frequent n-gram (n in `top`, counted when it
    occurs twice or more) and by all n-grams that occur more than once (n in `dup`).

    n-grams are compared by a polynomial hash mod 2**64, built up one word at a time. For the
    duplicate fractions, an (n+1)-gram can only repeat where the n-grams at i and i+1 both
    repeat, so each larger n only looks at those positions, and stops once none are left.
    """
    w = len(ids)
    out = {("top", n): 0 for n in top} | {("dup", n): 0 for n in dup}
    starts = np.concatenate(([0], np.cumsum(lengths)))
    h = ids.copy()
    repeated: np.ndarray | None = None  # dup: start positions whose (n-1)-gram repeats
    dup_done = not dup
    for n in range(1, max(top | dup, default=0) + 1):
        if n > w:
            break
        if n > 1:
            with np.errstate(over="ignore"):
                h = h[:-1] * _P + ids[n - 1 :]  # hash of words[i : i + n], for every i
        if n in top:
            _, first, counts = np.unique(h, return_index=True, return_counts=True)
            best = counts.max()
            if best >= 2:
                pos = first[counts == best]
                out[("top", n)] = int(best * (starts[pos + n] - starts[pos]).max())
        if dup_done or n < min(dup):
            continue
        cand = (
            np.arange(len(h)) if repeated is None else np.flatnonzero(repeated[:-1] & repeated[1:])
        )
        if len(cand) < 2:
            dup_done = True  # nothing repeats at n, so nothing repeats at any larger n
            continue
        _, inverse, counts = np.unique(h[cand], return_inverse=True, return_counts=True)
        dup_starts = cand[counts[inverse] > 1]
        repeated = np.zeros(len(h), bool)
        repeated[dup_starts] = True
        if n in dup and len(dup_starts):
            cover = np.zeros(w + 1, np.int64)  # +1 at each start, -1 past each end: a sweep line
            np.add.at(cover, dup_starts, 1)
            np.add.at(cover, dup_starts + n, -1)
            out[("dup", n)] = int(lengths[np.cumsum(cover[:-1]) > 0].sum())
    return out


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
        if len(line) > self.max_word_length and max(map(len, ws)) > self.max_word_length:
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
