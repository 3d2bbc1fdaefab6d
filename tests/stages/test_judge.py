"""stages/judge.py, core/judges.py, core/winrate.py and `llmctl eval judge`: a reward-model judge
prefers a planted better answer, the shown order is randomised and recorded (and cancels a judge
that always picks the first answer), an OpenAI-format endpoint (a local http.server in a thread)
is asked and parsed, Wilson intervals match hand values, and the CLI runs end to end."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pairs_fixtures import MARKER, WORDS, base_checkpoint, marker_pairs
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.judges import HttpJudge, RewardJudge, parse_verdict
from llmctl.core.winrate import pairwise_report, random_swaps, wilson, win_report
from llmctl.stages import judge, rm

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> dict[str, Path]:
    """A random 2-layer checkpoint and a reward model trained to prefer the word "kindly"."""
    root = tmp_path_factory.mktemp("judge")
    base = base_checkpoint(root / "base", tokens_dir)
    cfg = rm.RMConfig(
        data=str(marker_pairs(root / "pairs.jsonl", n=120)), init=str(base), val_fraction=0.0,
        epochs=2.0, batch_size=16, micro_batch=8, lr=3e-3, warmup_steps=2, eval_every=0,
        save_every=0, device="cpu", precision="fp32",
    )  # fmt: skip
    rm.run(root / "rm", cfg)
    return {"base": base, "rm": root / "rm"}


def planted(n: int, seed: int) -> tuple[list[list[dict[str, str]]], list[str], list[str]]:
    """Held-out prompts; A's answers hold the marker, B's the same words without it."""
    rng = random.Random(seed)
    convs, a, b = [], [], []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(5)]
        at = rng.randrange(6)
        convs.append([{"role": "user", "content": f"describe thing {1000 + i}"}])
        a.append(" ".join(words[:at] + [MARKER] + words[at:]))
        b.append(" ".join(words[:at] + [rng.choice(WORDS)] + words[at:]))
    return convs, a, b


def test_reward_model_judge_prefers_the_planted_better_answer(models: dict[str, Path]) -> None:
    convs, a, b = planted(40, seed=7)
    rows = judge.judge_answers(convs, a, b, RewardJudge(models["rm"]), seed=3)
    res = pairwise_report(rows)
    assert res["win_rate"]["value"] >= 0.8
    assert res["win_rate"]["ci95"][0] > 0.5  # significantly better than a coin
    for r in rows:  # the verdict follows the rewards whatever order they were shown in
        assert r["winner"] == ("a" if r["reward_a"] > r["reward_b"] else "b")
    # swapping the models turns wins into losses
    back = pairwise_report(judge.judge_answers(convs, b, a, RewardJudge(models["rm"]), seed=3))
    assert back["b_wins"] == res["a_wins"]


def test_order_is_randomised_reproducibly_and_recorded() -> None:
    swaps = random_swaps(200, seed=0, salt="judge/order")
    assert swaps == random_swaps(200, seed=0, salt="judge/order")
    assert swaps != random_swaps(200, seed=1, salt="judge/order")
    assert 70 < sum(swaps) < 130


class _Judge(BaseHTTPRequestHandler):
    """Canned OpenAI chat completions: model "marker" prefers the answer holding the marker,
    model "first" always says the first answer, model "rambling" hides its verdict in prose."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        user = body["messages"][-1]["content"]
        first = user.split("[The Start of Assistant A's Answer]")[1].split("[The End")[0]
        reply = {
            "marker": "Explanation... [[A]]" if MARKER in first else "Explanation... [[B]]",
            "first": "Both fine. My final verdict: [[A]]",
            "rambling": "Assistant B is better, mostly.",
        }[body["model"]]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_url_judge_asks_the_endpoint_and_maps_the_verdict_back(server: str) -> None:
    convs, a, b = planted(12, seed=5)
    _Judge.seen.clear()
    rows = judge.judge_answers(convs, a, b, HttpJudge(server, "marker", api_key="k"), seed=0)
    assert pairwise_report(rows)["a_wins"] == 12  # A wins in both shown orders
    assert {r["order"] for r in rows} == {"ab", "ba"}
    assert _Judge.seen[0]["path"] == "/v1/chat/completions"
    assert _Judge.seen[0]["auth"] == "Bearer k"
    assert _Judge.seen[0]["temperature"] == 0


def test_randomised_order_cancels_a_first_position_judge(server: str) -> None:
    convs, a, b = planted(40, seed=6)
    rows = judge.judge_answers(convs, a, b, HttpJudge(server, "first"), seed=0)
    for r in rows:
        assert r["winner"] == ("a" if r["order"] == "ab" else "b")
    res = pairwise_report(rows)
    assert res["first_shown_won"] == 1.0
    assert res["a_wins"] == res["order"]["ab"]
    assert 0.2 < res["win_rate"]["value"] < 0.8  # not 1.0, as it would be in a fixed order


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("reasons... [[A]]", "first"),
        ("[[B]] first, then on reflection [[C]]", "tie"),
        ("Final verdict: B", "second"),
        ("Assistant A is clearly better.", "first"),
        ("It's a tie.", "tie"),
        ("I cannot decide.", None),
    ],
)
def test_verdicts_are_parsed(text: str, want: str | None) -> None:
    assert parse_verdict(text) == want


def test_wilson_interval_hand_values() -> None:
    lo, hi = wilson(8, 10)  # textbook: 0.8 of 10 -> [0.490, 0.943]
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert wilson(0, 10)[0] == 0.0
    assert wilson(0, 0) == (0.0, 1.0)
    r = win_report(["a", "a", "tie", "b", None])
    assert (r["n"], r["invalid"], r["a_wins"], r["ties"], r["b_wins"]) == (4, 1, 2, 1, 1)
    assert r["score"] == pytest.approx(2.5 / 4)


def test_cli_end_to_end_with_a_reward_model_and_a_url_judge(
    models: dict[str, Path], server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"describe thing {i}"}) + "\n" for i in range(4))
    )
    base = str(models["base"])
    common = ["eval", "judge", str(prompts), "--a", base, "--b", base, "--max-new-tokens", "6",
              "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    r = runner.invoke(app, [*common, "--judge-rm", str(models["rm"]), "-o", str(tmp_path / "j")])
    assert r.exit_code == 0, r.output
    assert "A wins" in r.stderr
    res = json.loads((tmp_path / "j" / "results.json").read_text())
    assert res["n"] == 4
    rows = [json.loads(x) for x in (tmp_path / "j" / "judgments.jsonl").read_text().splitlines()]
    assert all(r["answer_a"] == r["answer_b"] for r in rows)  # same model, same seed
    assert all(r["winner"] == "tie" for r in rows)  # equal rewards

    monkeypatch.setenv("JUDGE_KEY", "secret")
    url = ["--judge-url", server, "--judge-model", "rambling", "--api-key-env", "JUDGE_KEY"]
    r = runner.invoke(app, [*common, *url, "-o", str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    assert "secret" not in (tmp_path / "u" / "manifest.json").read_text()


def test_judge_flag_errors(models: dict[str, Path], tmp_path: Path) -> None:
    base = str(models["base"])
    args = ["eval", "judge", "p.jsonl", "--a", base, "--b", base, "-o", str(tmp_path / "o")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert "exactly one judge" in r.stderr
    r = runner.invoke(app, [*args, "--judge-url", "http://x/v1", "--judge-model", "m",
                            "--api-key-env", "LLMCTL_TEST_UNSET_KEY"])  # fmt: skip
    assert r.exit_code == 2
    assert "LLMCTL_TEST_UNSET_KEY" in r.stderr
    assert not (tmp_path / "o").exists()
