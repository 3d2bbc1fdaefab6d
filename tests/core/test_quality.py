"""core/quality and core/pii: each filter keeps real prose and drops a document built to fail one
rule; measured values are the papers' definitions on small hand-checked inputs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmctl.core.errors import InputError
from llmctl.core.pii import redact
from llmctl.core.quality import (
    C4,
    GopherQuality,
    GopherRepetition,
    Rule,
    UrlBlocklist,
    check,
    load_blocklist,
)


@pytest.fixture(scope="module")
def prose() -> str:
    """Real English prose: one sentence-ending, code-free paragraph from each of 8 documentation
    topics that Python ships (pydoc_data.topics), blank lines between them."""
    from pydoc_data.topics import topics

    paras = []
    for name in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[name]):
            p = " ".join(p.split())
            if len(p.split()) >= 25 and p.endswith(".") and not re.search(r"[{}#*[]|>>>|::", p):
                paras.append(p)
                break
        if len(paras) == 8:
            break
    return "\n\n".join(paras)


def judge(flt: GopherQuality | GopherRepetition, text: str) -> str | None:
    drop = check(flt.name, flt.rules(), flt.measure(text))
    return drop.rule if drop else None


def test_rule_directions() -> None:
    assert Rule("r", "m", "min", 5).passes(5)
    assert not Rule("r", "m", "min", 5).passes(4.9)
    assert Rule("r", "m", "max", 0.1).passes(0.1)
    assert not Rule("r", "m", "max", 0.1).passes(0.11)
    drop = check("f", [Rule("r", "m", "min", 5)], {"m": 3})
    assert (drop.reason, drop.rule, drop.value, drop.detail) == ("f", "r", 3.0, "m 3 < 5")


# -- Gopher quality --------------------------------------------------------------------------------


def test_gopher_quality_keeps_prose(prose: str) -> None:
    m = GopherQuality().measure(prose)
    assert judge(GopherQuality(), prose) is None
    assert m["word_count"] > 200
    assert 4 < m["mean_word_length"] < 6
    assert m["stop_words"] > 20


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda p: " ".join(p.split()[:40]), "min_words"),
        (lambda p: " ".join(["a", "to", "of", "it", "be"] * 60), "min_mean_word_length"),
        (lambda p: " ".join(["internationalization", "counterrevolutionaries", "the", "of"] * 30), "max_mean_word_length"),
        (lambda p: p + " #tag" * 60, "max_symbol_word_ratio"),
        (lambda p: p + " ..." * 60, "max_symbol_word_ratio"),
        (lambda p: "\n".join("- " + w for w in p.split()), "max_bullet_lines"),
        (lambda p: "\n".join(" ".join(p.split()[i : i + 12]) + "\u2026" for i in range(0, 240, 12)), "max_ellipsis_lines"),
        (lambda p: p + " 1 2 3 4 5 6 7 8 9 10" * 20, "min_alpha_words"),
        (lambda p: " ".join(w for w in p.split() if w.lower().strip(".,") not in {"the", "be", "to", "of", "and", "that", "have", "with"}), "min_stop_words"),
    ],
)  # fmt: skip
def test_gopher_quality_drops(prose: str, make, rule: str) -> None:  # noqa: ANN001
    assert judge(GopherQuality(), make(prose)) == rule


def test_gopher_quality_thresholds_are_configurable(prose: str) -> None:
    assert judge(GopherQuality(min_words=10_000), prose) == "min_words"


# -- Gopher repetition -----------------------------------------------------------------------------


def test_gopher_repetition_keeps_prose(prose: str) -> None:
    assert judge(GopherRepetition(), prose) is None


def test_gopher_repetition_measures_by_hand() -> None:
    m = GopherRepetition().measure("a b\nc d\na b\na b")
    assert m["dup_line_frac"] == 2 / 4  # two lines repeat an earlier one
    assert m["dup_line_char_frac"] == 6 / 15  # 2 x len("a b") of 15 characters
    m = GopherRepetition().measure("one two three one two three")
    # words: one two three one two three (18 word characters); the top 3-gram occurs twice
    assert m["top_3gram_frac"] == 2 * 11 / 22
    assert m["top_2gram_frac"] == 2 * 8 / 22  # "one two", "two three" twice each: the longer
    m = GopherRepetition().measure("x y z w v " * 2 + "q")
    assert m["dup_5gram_frac"] == 10 / 11  # both copies of the repeated 5-gram, overlaps once


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda p: "\n".join([p.split("\n\n")[0]] + ["Read more"] * 30), "max_dup_line_frac"),
        (lambda p: "\n\n".join(p.split("\n\n")[:2] * 3), "max_dup_para_frac"),
        (lambda p: p + ("\n\n" + " ".join(p.split("\n\n")[:4])) * 2, "max_dup_para_char_frac"),
        (lambda p: p + " buy now" * 150, "max_top_2gram"),
        (lambda p: p + " " + " ".join(p.split()[:120]), "max_dup_5gram"),
    ],
)
def test_gopher_repetition_drops(prose: str, make, rule: str) -> None:  # noqa: ANN001
    flt = GopherRepetition()
    text = make(prose)
    m = flt.measure(text)
    failed = [r.name for r in flt.rules() if not r.passes(m[r.measure])]
    assert rule in failed, (failed, {k: round(v, 3) for k, v in m.items()})


# -- C4 --------------------------------------------------------------------------------------------


def test_c4_keeps_prose_and_its_lines(prose: str) -> None:
    cleaned, m, removed = C4().clean(prose)
    assert check("c4", C4().rules(), m) is None
    assert cleaned == prose.replace("\n\n", "\n")
    assert not removed


def test_c4_removes_lines(prose: str) -> None:
    lines = [
        "Home About",  # short_line
        "Please enable JavaScript in your browser to see this page properly.",
        "By using this site you agree to our Terms of Use and our rules.",
        "We use cookies to give you the best experience on our website.",
        "Posted on the third of May by the editors of the site",  # no_terminal_punct
        "Read the rest of this long article on our page...",  # ellipsis is not terminal
    ]
    text = "\n".join(lines) + "\n" + prose + " It was cited twice.[1][citation needed]"
    cleaned, m, removed = C4().clean(text)
    assert all(line not in cleaned for line in lines)
    assert cleaned.endswith("It was cited twice.")
    assert {k: v for k, v in removed.items() if k.endswith(":lines")} == {
        "short_line:lines": 1,
        "javascript:lines": 1,
        "policy:lines": 2,
        "no_terminal_punct:lines": 2,
    }
    assert check("c4", C4().rules(), m) is None
    _, _, kept_js = C4(javascript=False).clean(text)
    assert "javascript:lines" not in kept_js


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda p: p + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
        (lambda p: p + "\nfunction f(x) { return x; }", "curly_bracket"),
        (lambda p: "This page has one sentence. And a second one here.", "min_sentences"),
        (lambda p: "Home\nAbout\nContact", "no_lines_left"),
    ],
)
def test_c4_drops(prose: str, make, rule: str) -> None:  # noqa: ANN001
    _, m, _ = C4().clean(make(prose))
    drop = check("c4", C4().rules(), m)
    assert drop is not None
    assert drop.rule == rule


def test_c4_page_rules_switch_off(prose: str) -> None:
    _, m, _ = C4(curly_bracket=False).clean(prose + "\nA set looks like {1, 2} in Python.")
    assert check("c4", C4(curly_bracket=False).rules(), m) is None


# -- URL blocklist ---------------------------------------------------------------------------------


def test_url_blocklist_domains_words_and_file(tmp_path: Path) -> None:
    f = tmp_path / "block.txt"
    f.write_text(
        "# comment\nbad.example   # trailing comment\ndomain:www.worse.example\nword:casino\n"
    )
    bl = load_blocklist(str(f))
    assert bl.match("https://bad.example/x") == "domain bad.example"
    assert bl.match("http://a.b.bad.example:8080/") == "domain bad.example"
    assert bl.match("https://worse.example/") == "domain worse.example"
    assert bl.match("https://notbad.example/") is None
    assert bl.match("https://x.example/free-casino-bonus") == "word casino"
    assert bl.match("https://x.example/casinos") is None  # whole tokens only
    assert bl.match(None) is None
    flt = UrlBlocklist(path=str(f))
    assert flt.measure_url("https://bad.example/")[0] == {"blocked": 1.0}
    assert check("url_blocklist", flt.rules(), flt.measure_url("https://ok.example/")[0]) is None


def test_default_blocklist_ships_with_the_package() -> None:
    bl = load_blocklist(None)
    assert bl.match("https://example.org/online-casino") == "word casino"
    assert bl.match("https://www.essex.example/sussex") is None
    with pytest.raises(InputError, match="cannot read the URL blocklist"):
        load_blocklist("/no/such/list.txt")


# -- PII -------------------------------------------------------------------------------------------


def test_pii_redaction_counts_each_kind() -> None:
    text = (
        "Write to jane.doe+news@mail.example.co.uk or admin@example.com. "
        "The server 8.8.8.8 and 2001:4860:4860::8888 answer; 192.168.1.10 is private. "
        "Call +1 415-555-0132, (415) 555-0199 or +44 20 7946 0958."
    )
    out, counts = redact(text)
    assert dict(counts) == {"email": 2, "ip": 2, "phone": 3}
    assert "<EMAIL>" in out
    assert "<IP_ADDRESS>" in out
    assert "<PHONE>" in out
    assert "192.168.1.10" in out
    assert "@" not in out
    assert "555" not in out


def test_pii_leaves_numbers_that_are_not_pii() -> None:
    text = (
        "Python 3.11.7 was released in 2023; ISBN 978-3-16-148410-0; on 2024-01-15 it cost "
        "1,234.56 for 10-20 units. C++ uses std::vector and a::b; the time was 12:30:45."
    )
    out, counts = redact(text)
    assert out == text
    assert not counts
