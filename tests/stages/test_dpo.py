"""dpo: raises the chosen-over-rejected log-prob margin on held-out pairs; the reference stays fixed."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pairs_fixtures import base_checkpoint, marker_pairs
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest, dir_fingerprint
from llmctl.core.chatdata import encode_preferences, load_preferences
from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.errors import ConfigError
from llmctl.core.pairs import chunks, split_heldout
from llmctl.core.train_loop import read_metrics
from llmctl.stages import dpo

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine threads spin-wait.
    # Module scope (autouse runs first), so the module's training fixture runs on one thread too.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(data: Path, init: Path, **over: object) -> dpo.DPOConfig:
    base = {
        "data": str(data),
        "init": str(init),
        "val_fraction": 0.2,
        "epochs": 2.0,
        "batch_size": 16,
        "micro_batch": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "eval_every": 10,
        "save_every": 0,
        "device": "cpu",
        "precision": "fp32",
    }
    return dpo.DPOConfig(**{**base, **over})


def heldout_logprob_margin(ckpt: Path, data: Path) -> float:
    """Mean over held-out pairs of log pi(chosen) - log pi(rejected), measured independently."""
    model = load_checkpoint(ckpt).model
    tok = load_checkpoint(ckpt).tokenizer
    prefs, _ = load_preferences(data)
    _, val = split_heldout(prefs, 0.2, 0)
    pairs, _ = encode_preferences(tok, [prefs[i] for i in val], 64)
    margins = []
    with torch.no_grad():
        for b in chunks(pairs, 64, tok.pad_id):
            lp = torch.log_softmax(model(b.ids).float(), -1)
            safe = b.targets.clamp(min=0)
            tok_lp = lp.gather(-1, safe[..., None]).squeeze(-1) * (b.targets != -100)
            seq = tok_lp.sum(-1)
            margins.append(seq[: b.n_pairs] - seq[b.n_pairs :])
    return float(torch.cat(margins).mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> dict:
    """A base checkpoint, 200 marker pairs, and a DPO run on them (20 steps)."""
    root = tmp_path_factory.mktemp("dpo")
    base = base_checkpoint(root / "base", tokens_dir)
    data = marker_pairs(root / "pairs.jsonl")
    before = dir_fingerprint(base)
    m = dpo.run(root / "dpo", _cfg(data, base))
    return {"base": base, "data": data, "out": root / "dpo", "m": m, "base_fp": before}


def test_dpo_raises_the_heldout_margin(setup: dict) -> None:
    m = setup["m"]
    before = heldout_logprob_margin(setup["base"], setup["data"])
    after = heldout_logprob_margin(setup["out"], setup["data"])
    assert after > before + 5.0, (before, after)
    assert m.stats["val_accuracy"] >= 0.9
    # The implicit reward margin is beta times the change of the log-prob margin.
    assert m.stats["val_margin"] == pytest.approx(0.1 * (after - before), rel=1e-3, abs=1e-4)
    assert m.stats["val_chosen_reward"] > 0 > m.stats["val_rejected_reward"]


def test_reference_is_the_frozen_init(setup: dict) -> None:
    m = setup["m"]
    # Step 1: the policy equals the reference, so every margin is 0 and the loss is log 2.
    first = read_metrics(setup["out"] / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert m.stats["val_margin_init"] == pytest.approx(0.0, abs=1e-5)
    assert m.stats["val_loss_init"] == pytest.approx(math.log(2), abs=1e-5)
    # The init checkpoint is untouched and the policy moved away from it.
    assert dir_fingerprint(setup["base"]) == setup["base_fp"]
    a = load_checkpoint(setup["base"]).model.state_dict()
    b = load_checkpoint(setup["out"]).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_output_is_a_plain_checkpoint(setup: dict) -> None:
    ck = load_checkpoint(setup["out"])
    assert ck.model.cfg.n_layers == 2
    assert not (setup["out"] / "head.safetensors").exists()
    man = Manifest.read(setup["out"])
    assert man.kind == "checkpoint"
    assert man.stage == "dpo"
    assert man.config["beta"] == 0.1


def test_a_separate_reference_changes_the_start(setup: dict, tmp_path: Path) -> None:
    # With --ref another model, policy != reference at step 1: the implicit rewards are not 0.
    other = base_checkpoint(tmp_path / "other", setup["base"], seed=1)
    m = dpo.run(tmp_path / "d", _cfg(setup["data"], setup["base"], ref=str(other), max_steps=1))
    assert abs(m.stats["val_chosen_reward_init"]) > 0.01
    assert m.inputs[-1]["path"] == str(other.resolve())


def test_sequence_logprobs_without_the_fused_head(
    setup: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = load_checkpoint(setup["base"])
    prefs, _ = load_preferences(setup["data"])
    pairs, _ = encode_preferences(ck.tokenizer, prefs[:6], 64)
    b = next(chunks(pairs, 6, ck.tokenizer.pad_id))
    with torch.no_grad():
        fused = dpo.sequence_logprobs(ck.model, b)
        monkeypatch.setattr(dpo, "token_logprobs", None)
        plain = dpo.sequence_logprobs(ck.model, b)
    assert torch.allclose(fused, plain, atol=1e-4)
    assert (plain < 0).all()


def test_bad_beta_is_a_config_error(setup: dict) -> None:
    with pytest.raises(ConfigError, match="--beta must be > 0"):
        _cfg(setup["data"], setup["base"], beta=0)


def test_cli(setup: dict, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        ["-q", "dpo", str(setup["data"]), "--init", str(setup["base"]), "-o", str(tmp_path / "o")]
        + ["--max-steps", "2", "--batch-size", "8", "--micro-batch", "8", "--beta", "0.2"]
        + ["--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    assert Manifest.read(tmp_path / "o").config["beta"] == 0.2
    r = runner.invoke(app, ["dpo", str(setup["data"]), "-o", str(tmp_path / "p")])
    assert r.exit_code == 2
    assert "--init is required" in r.stderr
