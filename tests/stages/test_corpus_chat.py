"""`llmctl corpus --format chat|prefs|prompts`: the embedded post-training data (core/chatgen.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmctl.core import chatgen
from llmctl.core.artifacts import Manifest
from llmctl.core.errors import ConfigError
from llmctl.stages import corpus, inspect

ROWS = 60
FORMATS = ("chat", "prefs", "prompts")


def build(dst: Path, fmt: str, seed: int = 0) -> Path:
    corpus.run(dst, corpus.CorpusConfig(format=fmt, max_docs=ROWS, seed=seed))
    return dst


def table(path: Path) -> pa.Table:
    return pq.read_table(sorted(path.glob("part-*.parquet")))


def subject(source: str) -> str:
    return source.removeprefix("docstrings:")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("post")
    return {fmt: build(root / fmt, fmt) for fmt in FORMATS}


def test_chat_schema_and_turns(built: dict[str, Path]) -> None:
    t = table(built["chat"])
    assert t.schema == chatgen.SCHEMAS["chat"]
    assert t.num_rows == ROWS
    for row in t.to_pylist():
        msgs = row["messages"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles
        assert len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)  # alternates, ends on assistant
        assert all(m["content"].strip() for m in msgs)
        assert row["text"] == "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        assert row["id"].startswith(f"chat/{subject(row['source'])}/")


def test_prefs_schema_and_pairs(built: dict[str, Path]) -> None:
    t = table(built["prefs"])
    assert t.schema == chatgen.SCHEMAS["prefs"]
    assert t.num_rows == ROWS
    rows = t.to_pylist()
    for row in rows:
        assert row["chosen"].strip()
        assert row["rejected"].strip()
        assert row["chosen"] != row["rejected"]
        assert row["text"] == row["prompt"]
        assert row["rejected_kind"] in ("mismatch", "shuffled", "truncated")
    assert {r["rejected_kind"] for r in rows} == {"mismatch", "shuffled", "truncated"}


def test_prompts_schema(built: dict[str, Path]) -> None:
    t = table(built["prompts"])
    assert t.schema == chatgen.SCHEMAS["prompts"]
    assert t.num_rows == ROWS
    for row in t.to_pylist():
        assert row["prompt"].strip()
        assert row["reference"].strip()
        assert row["text"] == row["prompt"]


def test_sets_are_disjoint(built: dict[str, Path]) -> None:
    subjects = {}
    for fmt in FORMATS:
        subjects[fmt] = {subject(s) for s in table(built[fmt]).column("source").to_pylist()}
        assert {chatgen.split_of(s) for s in subjects[fmt]} == {fmt}
    assert not subjects["chat"] & subjects["prefs"]
    assert not subjects["chat"] & subjects["prompts"]
    assert not subjects["prefs"] & subjects["prompts"]


def test_split_is_stable_and_roughly_80_10_10() -> None:
    names = [f"mod{i}.func{i}" for i in range(3000)]
    counts = {s: sum(chatgen.split_of(n) == s for n in names) for s in FORMATS}
    assert 0.75 < counts["chat"] / 3000 < 0.85
    assert 0.07 < counts["prefs"] / 3000 < 0.13
    assert chatgen.split_of("json.dumps") == chatgen.split_of("json.dumps")


def test_same_seed_gives_identical_bytes(built: dict[str, Path], tmp_path: Path) -> None:
    for fmt in FORMATS:
        again = build(tmp_path / fmt, fmt)
        a, b = sorted(built[fmt].glob("part-*")), sorted(again.glob("part-*"))
        assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
        assert Manifest.read(again).fingerprint == Manifest.read(built[fmt]).fingerprint


def test_seed_changes_templates_not_subjects(built: dict[str, Path], tmp_path: Path) -> None:
    other = table(build(tmp_path / "chat1", "chat", seed=1))
    base = table(built["chat"])
    assert other.column("source").to_pylist() == base.column("source").to_pylist()
    assert other.column("text").to_pylist() != base.column("text").to_pylist()


def test_manifest_and_inspect(built: dict[str, Path]) -> None:
    m = Manifest.read(built["prefs"])
    assert m.kind == "docs"
    assert m.config["format"] == "prefs"
    assert m.counts["documents"] == ROWS
    assert sum(v for k, v in m.counts.items() if k.startswith("rejected_")) == ROWS
    assert m.stats["python"]
    rows = inspect.run(built["chat"], head=2).rows
    assert len(rows) == 2
    assert rows[0]["text"].startswith(("system: ", "user: "))


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="--format must be one of"):
        corpus.CorpusConfig(format="sft")  # type: ignore[arg-type]


def test_docstring_summary_cleans_and_caps() -> None:
    doc = "dumps(obj) -> str\n\nSerialize ``obj`` to a\nJSON :class:`str`.\n\nMore detail."
    assert chatgen.docstring_summary(doc, "dumps") == "Serialize `obj` to a JSON `str`."
    long = " ".join(
        ["This sentence is about twenty words long, more or less, for a cap test."] * 12
    )
    out = chatgen.docstring_summary(long, "f")
    assert len(out) <= chatgen.MAX_ANSWER
    assert out.endswith(".")
    assert chatgen.docstring_summary(">>> f()\n1", "f") == ""


def test_params_answer_from_ast() -> None:
    code = 'def wrap(text, width=70, *, fix=False, **kw):\n    """Wrap a paragraph of text."""\n'
    (sub,) = chatgen.stdlib_subjects([("textwrap", code)])
    ans = chatgen.answer("params", sub)
    assert "`textwrap.wrap(text, width=70, *, fix=False, **kw)`" in ans
    assert "- `fix` (keyword-only, default `False`)" in ans
    code = 'class C:\n    def m(self, a, /, b, *args, c):\n        """Do a thing to a and b."""\n'
    (method,) = chatgen.stdlib_subjects([("mod", code)])
    assert "`mod.C.m(a, /, b, *args, c)`" in chatgen.answer("params", method)
