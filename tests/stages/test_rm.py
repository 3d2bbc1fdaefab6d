"""rm: a reward model learns a synthetic preference; checkpoint format and checks; rm score."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from pairs_fixtures import MARKER, base_checkpoint, marker_pairs
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest, partial_path
from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.errors import InputError
from llmctl.core.heads import HEAD_FILE, load_reward_model
from llmctl.core.progress import Silent
from llmctl.core.tokenizer import Tokenizer, train_tokenizer
from llmctl.core.train_loop import read_metrics
from llmctl.stages import rm

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine threads spin-wait.
    # Module scope (autouse runs first), so the module's training fixture runs on one thread too.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(data: Path, init: Path, **over: object) -> rm.RMConfig:
    base = {
        "data": str(data),
        "init": str(init),
        "val_fraction": 0.2,
        "epochs": 3.0,
        "batch_size": 16,
        "micro_batch": 8,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 10,
        "save_every": 0,
        "device": "cpu",
        "precision": "fp32",
    }
    return rm.RMConfig(**{**base, **over})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> dict:
    """A base checkpoint, 200 marker pairs, and a reward model trained on them (30 steps)."""
    root = tmp_path_factory.mktemp("rm")
    base = base_checkpoint(root / "base", tokens_dir)
    data = marker_pairs(root / "pairs.jsonl")
    m = rm.run(root / "rm", _cfg(data, base))
    return {"root": root, "base": base, "data": data, "rm": root / "rm", "m": m}


def test_reward_model_learns_the_preference(setup: dict) -> None:
    m = setup["m"]
    assert m.counts["val_pairs"] == 40
    assert m.counts["train_pairs"] == 160
    assert m.stats["val_accuracy"] >= 0.9, m.stats
    assert m.stats["val_margin"] > 1.0
    assert m.stats["val_loss"] < 0.5 * m.stats["val_loss_init"]
    assert m.stats["val_loss_init"] == pytest.approx(0.693, abs=0.02)  # small head: r ~ 0 at start
    evals = [r for r in read_metrics(setup["rm"] / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert (setup["rm"] / "loss.png").is_file()


def test_output_loads_as_reward_model_and_as_lm(setup: dict) -> None:
    model, tok = load_reward_model(setup["rm"])
    cfg = json.loads((setup["rm"] / "config.json").read_text())
    assert cfg["head"] == {"kind": "reward", "file": HEAD_FILE}
    assert Manifest.read(setup["rm"]).kind == "checkpoint"
    ask = [{"role": "user", "content": "describe thing 7"}]
    good, _ = tok.render_chat([*ask, {"role": "assistant", "content": f"red {MARKER} tree"}])
    bad, _ = tok.render_chat([*ask, {"role": "assistant", "content": "red stone tree"}])
    r = model.score([good, bad], pad_id=tok.pad_id)
    assert r[0] > r[1]
    # Batched with padding or alone: the same reward (read at the last real token).
    assert model.score([bad], pad_id=tok.pad_id)[0] == pytest.approx(float(r[1]), abs=1e-5)
    assert load_checkpoint(setup["rm"]).model.cfg.d_model == 32  # still a plain LM checkpoint


def test_plain_checkpoint_is_not_a_reward_model(setup: dict) -> None:
    with pytest.raises(InputError, match="is not a reward model .*no head.safetensors") as e:
        load_reward_model(setup["base"])
    assert "llmctl rm" in (e.value.hint or "")


def test_tokenizer_mismatch_is_refused(setup: dict) -> None:
    text = [f"some other text to train a different tokenizer on, line {i}" for i in range(50)]
    other = Tokenizer.from_bytes(train_tokenizer(text, 300, num_threads=1))
    with pytest.raises(
        InputError, match=r"reward model .* uses tokenizer \w+, the policy uses \w+"
    ):
        load_reward_model(setup["rm"], tokenizer=other)
    own = Tokenizer.load(setup["rm"])
    assert load_reward_model(setup["rm"], tokenizer=own)[1].fingerprint == own.fingerprint


def test_empty_chosen_fails_and_writes_nothing(setup: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go"}] * 3
    rows.append({"prompt": "hi", "chosen": "  ", "rejected": "go"})
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"row 3, column 'chosen' is empty"):
        rm.run(tmp_path / "out", _cfg(bad, setup["base"]))
    assert not (tmp_path / "out").exists()
    assert not partial_path(tmp_path / "out").exists()


def test_resume_reproduces_the_loss_trace(setup: dict, tmp_path: Path) -> None:
    cfg = _cfg(setup["data"], setup["base"], max_steps=6, save_every=3, eval_every=0)
    rm.run(tmp_path / "full", cfg)

    class Crash(Silent):
        seen = 0

        def advance(self, n: float = 1, **fields: object) -> None:
            self.seen += 1
            if self.seen == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rm.run(tmp_path / "cut", cfg, progress=Crash())
    m = rm.run(tmp_path / "cut", cfg, resume=True)
    assert m.stats["resumed_from_step"] == 5  # the interrupt saved step 5
    trace, again = (
        [
            (r["step"], r["loss"])
            for r in read_metrics(tmp_path / d / "metrics.jsonl")
            if "loss" in r
        ]
        for d in ("full", "cut")
    )
    assert [s for s, _ in again] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in again] == pytest.approx([v for _, v in trace], abs=1e-4)


def test_cli_trains_and_scores_pairs(setup: dict, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        ["-q", "rm", str(setup["data"]), "--init", str(setup["base"]), "-o", str(tmp_path / "r")]
        + ["--max-steps", "2", "--batch-size", "8", "--micro-batch", "4", "--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / HEAD_FILE).is_file()
    r = runner.invoke(
        app, ["-q", "rm", "score", str(setup["rm"]), str(setup["data"]), "-o", str(tmp_path / "s")]
    )
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "s" / "part-00000.parquet").to_pylist()
    assert len(t) == 200
    assert set(t[0]) == {
        "prompt",
        "chosen",
        "rejected",
        "score_chosen",
        "score_rejected",
    }
    m = Manifest.read(tmp_path / "s")
    assert m.kind == "docs"
    assert m.stats["accuracy"] >= 0.9
    assert sum(x["score_chosen"] > x["score_rejected"] for x in t) / 200 == m.stats["accuracy"]


def test_score_conversations(setup: dict, tmp_path: Path) -> None:
    convs = tmp_path / "chats.jsonl"
    with open(convs, "w") as f:
        for text in (f"red {MARKER} tree", "red stone tree"):
            msgs = [
                {"role": "user", "content": "describe thing 3"},
                {"role": "assistant", "content": text},
            ]
            f.write(json.dumps({"messages": msgs, "id": text}) + "\n")
    m = rm.score(setup["rm"], convs, tmp_path / "s", rm.RMScoreConfig(device="cpu"))
    rows = pq.read_table(tmp_path / "s" / "part-00000.parquet").to_pylist()
    assert [r["id"] for r in rows] == [f"red {MARKER} tree", "red stone tree"]
    assert rows[0]["score"] > rows[1]["score"]
    assert m.stats["format"] == "conversations"
    assert m.counts["rows"] == 2


def test_score_refuses_a_plain_checkpoint(setup: dict, tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["rm", "score", str(setup["base"]), str(setup["data"]), "-o", str(tmp_path / "s")]
    )
    assert r.exit_code == 2
    assert "is not a reward model" in r.stderr
    assert not (tmp_path / "s").exists()
