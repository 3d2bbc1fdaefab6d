"""stages/human_rating.py and `llmctl eval human-export` / `human-import`: blind sheets (no model
names, escaped text, no external resources), and the round trip rater CSV + key -> the win-rate
report, for the spreadsheet and for the page's download format."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from pairs_fixtures import base_checkpoint
from typer.testing import CliRunner

from llmctl.cli import app

runner = CliRunner()
HOSTILE = "<script>alert('x')</script> & \"quotes\""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> dict[str, Path]:
    """Two differently initialised checkpoints' answers to 6 prompts, exported for raters."""
    root = tmp_path_factory.mktemp("human")
    a = base_checkpoint(root / "model_alpha", tokens_dir, seed=0)
    b = base_checkpoint(root / "model_beta", tokens_dir, seed=1)
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"describe thing {i}"} for i in range(5)] + [{"prompt": HOSTILE}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "export"
    r = runner.invoke(app, ["eval", "human-export", str(prompts), "--a", str(a), "--b", str(b),
                            "--max-new-tokens", "8", "--temperature", "1.0", "--device", "cpu",
                            "--precision", "fp32", "-o", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    return {"root": root, "out": out}


def _sheet(out: Path) -> list[dict[str, str]]:
    with open(out / "raters" / "ratings.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_rater_files_are_blind_and_self_contained(exported: dict[str, Path]) -> None:
    out = exported["out"]
    page = (out / "raters" / "rate.html").read_text()
    sheet = (out / "raters" / "ratings.csv").read_text()
    for text in (page, sheet):
        assert "model_alpha" not in text
        assert "model_beta" not in text
    assert not re.search(r"https?://|\bsrc=|<link|@import", page)  # nothing fetched from outside
    assert "<script>alert" not in page  # answers and prompts are escaped
    assert "&lt;script&gt;alert" in page
    key = json.loads((out / "key.json").read_text())
    assert sorted(key["items"]) == sorted(r["item_id"] for r in _sheet(out))
    assert all(f'data-id="{i}"' in page for i in key["items"])
    assert {v["order"] for v in key["items"].values()} <= {"ab", "ba"}
    assert key["a"].endswith("model_alpha")


def test_round_trip_maps_ratings_back_to_the_models(exported: dict[str, Path]) -> None:
    out, root = exported["out"], exported["root"]
    key = json.loads((out / "key.json").read_text())
    rows = _sheet(out)
    for r in rows:  # a rater who always prefers model A's answer, wherever it is shown
        item = key["items"][r["item_id"]]
        if item["answer_a"] == item["answer_b"]:
            r["rating"] = "tie"
        else:
            r["rating"] = "1" if r["answer_1"] == item["answer_a"] else "2"
    filled = root / "filled.csv"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res_dir = root / "res"
    r = runner.invoke(app, ["eval", "human-import", str(filled), str(out / "key.json"),
                            "-o", str(res_dir)])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((res_dir / "results.json").read_text())
    distinct = sum(v["answer_a"] != v["answer_b"] for v in key["items"].values())
    assert distinct >= 3
    assert (res["a_wins"], res["b_wins"], res["ties"]) == (distinct, 0, len(rows) - distinct)
    assert res["judge"] == "human"
    assert "A wins" in r.stderr


def test_page_download_format_and_several_raters(exported: dict[str, Path]) -> None:
    """The page saves item_id,rating,comment; a rater who always clicks "1" helps whichever model
    was shown first, so A's wins equal the items shown in order ab."""
    out, root = exported["out"], exported["root"]
    key = json.loads((out / "key.json").read_text())
    ids = list(key["items"])
    one = root / "page1.csv"
    one.write_text("item_id,rating,comment\r\n" + "".join(f'"{i}","1",""\r\n' for i in ids))
    two = root / "page2.csv"
    two.write_text("item_id,rating,comment\n" + "".join(f"{i},,\n" for i in ids))  # unrated
    res_dir = root / "res2"
    r = runner.invoke(app, ["eval", "human-import", str(one), str(two), str(out / "key.json"),
                            "-o", str(res_dir)])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((res_dir / "results.json").read_text())
    ab = sum(v["order"] == "ab" for v in key["items"].values())
    assert (res["a_wins"], res["b_wins"], res["invalid"]) == (ab, len(ids) - ab, len(ids))
    assert res["first_shown_won"] == 1.0


def test_bad_ratings_are_clear_errors(exported: dict[str, Path], tmp_path: Path) -> None:
    key = exported["out"] / "key.json"
    first = next(iter(json.loads(key.read_text())["items"]))
    cases = {
        "item_id,rating\nnope-0001,1\n": "is not in",
        f"item_id,rating\n{first},3\n": "is not 1, 2 or tie",
        "id,score\nx,1\n": "needs columns item_id and rating",
    }
    for text, message in cases.items():
        f = tmp_path / "bad.csv"
        f.write_text(text)
        r = runner.invoke(
            app, ["eval", "human-import", str(f), str(key), "-o", str(tmp_path / "o")]
        )
        assert r.exit_code == 2, r.output
        assert message in r.stderr
        assert not (tmp_path / "o").exists()


# A minimal DOM for the page's script: rate item 0 "2" with a quoted comment, press Download.
_DOM_STUB = r"""
const js = require('fs').readFileSync(process.argv[2], 'utf8');
const ids = JSON.parse(js.match(/var IDS = (\[.*?\])/)[1]);
const on = {}, sections = {};
ids.forEach(id => {
  const radios = ['1', 'tie', '2'].map(v => ({value: v, checked: false})), comment = {value: ''};
  sections[id] = {radios, comment, classList: {toggle() {}}, querySelectorAll: () => radios,
    querySelector: q => q === '.comment' ? comment : radios.find(r => r.checked) || null};
});
let saved = null;
const progress = {textContent: ''}, btn = {addEventListener: (e, f) => { btn.click = f; }};
global.localStorage = {getItem: () => null, setItem() {}};
global.Blob = function (parts) { this.text = parts.join(''); };
global.URL = {createObjectURL: b => { saved = b.text; return 'blob:'; }};
global.document = {
  querySelector: q => sections[q.match(/data-id="(.*?)"/)[1]],
  getElementById: x => x === 'progress' ? progress : btn,
  addEventListener: (e, f) => { on[e] = f; },
  createElement: () => ({click() {}, remove() {}}), body: {appendChild() {}},
};
eval(js);
sections[ids[0]].radios[2].checked = true;
sections[ids[0]].comment.value = 'a "quoted", note';
on.change();
btn.click();
process.stdout.write(progress.textContent + '\n' + saved);
"""


def test_the_page_script_saves_a_csv_that_imports(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the Python round trip above still runs)")
    out = exported["out"]
    page = (out / "raters" / "rate.html").read_text()
    (tmp_path / "page.js").write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    (tmp_path / "stub.js").write_text(_DOM_STUB)
    r = subprocess.run([node, str(tmp_path / "stub.js"), str(tmp_path / "page.js")],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0, r.stderr
    progress, saved = r.stdout.split("\n", 1)
    assert progress == "1 of 6 rated."
    (tmp_path / "page.csv").write_text(saved)
    rows = list(csv.DictReader(saved.splitlines()))
    assert rows[0]["rating"] == "2"
    assert rows[0]["comment"] == 'a "quoted", note'
    res = runner.invoke(app, ["eval", "human-import", str(tmp_path / "page.csv"),
                              str(out / "key.json"), "-o", str(tmp_path / "res")])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "res" / "results.json").read_text())
    assert (got["n"], got["invalid"]) == (1, 5)
