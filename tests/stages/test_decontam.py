"""stages/decontam.py and `llmctl eval decontam`: a verbatim copy and an embedded 13-word passage
are flagged (with their overlap share and the training doc), a novel item is not, a short item is
counted as unchecked, normalisation ignores case and punctuation, and --min-overlap / --fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.stages import decontam

runner = CliRunner()
DOC0 = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn "
    "and counts the sheep one by one until night falls over the quiet valley."
)
DOC1 = "Completely unrelated training text about compilers, registers and instruction scheduling."
PASSAGE = "the farmer watches from the old red barn and counts the sheep one by"  # 14 words of DOC0


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in (DOC1, DOC0)))
    items = [
        {"id": "copy", "question": DOC0.upper().replace(" ", "  "), "answer": "x"},  # verbatim
        {"id": "embedded", "question": "Q: " + PASSAGE + "? Then answer something new about "
         "lighthouses, tides and the harbour master's ledger of ships arriving late."},
        {"id": "novel", "question": "Which register holds the return address on this machine "
         "after a call instruction has been executed by the processor today?"},
        {"id": "short", "question": "Too short to check."},
        {"id": "in_choices", "question": "Pick one of these options please", "choices":
         ["a", "the quick brown fox jumps over the lazy dog while the farmer watches from"]},
    ]  # fmt: skip
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in items))
    return {"train": train, "eval": ev, "root": tmp_path}


def _flagged(out: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (out / "contaminated.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def test_copies_and_embedded_passages_are_flagged(files: dict[str, Path]) -> None:
    out = files["root"] / "o"
    r = runner.invoke(app, ["eval", "decontam", str(files["eval"]), str(files["train"]),
                            "-o", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    flagged = _flagged(out)
    assert set(flagged) == {"copy", "embedded", "in_choices"}
    assert flagged["copy"]["train_docs"] == [1]
    assert flagged["embedded"]["ngrams_found"] == 2  # 14 shared words = two 13-grams
    assert 0 < flagged["embedded"]["overlap"] < 0.2
    res = json.loads((out / "results.json").read_text())
    assert (res["items"], res["checked"], res["too_short"], res["contaminated"]) == (5, 4, 1, 3)
    assert res["train_docs"] == 2


def test_min_overlap_and_fields(files: dict[str, Path]) -> None:
    cfg = decontam.DecontamConfig(min_overlap=0.5)
    decontam.run(files["eval"], files["train"], files["root"] / "a", cfg)
    assert set(_flagged(files["root"] / "a")) == {"copy"}
    cfg = decontam.DecontamConfig(fields=("question",))
    decontam.run(files["eval"], files["train"], files["root"] / "b", cfg)
    assert set(_flagged(files["root"] / "b")) == {"copy", "embedded"}  # choices not checked


def test_an_unknown_field_is_a_clear_error(files: dict[str, Path]) -> None:
    out = files["root"] / "o"
    r = runner.invoke(app, ["eval", "decontam", str(files["eval"]), str(files["train"]),
                            "--fields", "prompt", "-o", str(out)])  # fmt: skip
    assert r.exit_code == 2
    assert "no eval row has a field 'prompt'" in r.stderr
    assert not out.exists()


def test_normalisation() -> None:
    assert decontam.words("Hello, WORLD!  it's-fine_ok") == [
        "hello",
        "world",
        "it",
        "s",
        "fine",
        "ok",
    ]
    assert list(decontam.ngrams(["a", "b", "c"], 2)) == ["a b", "b c"]
    assert list(decontam.ngrams(["a"], 2)) == []
