"""pretrain: learning, exact resume, failure handling, tokenizer checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.core.artifacts import Manifest, partial_path
from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.errors import ConfigError, InputError, TrainingError
from llmctl.core.progress import Silent
from llmctl.core.train_loop import read_metrics
from llmctl.stages import pretrain, tokenize


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def one_doc_tokens(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> Path:
    """A corpus of one short document repeated: a model can memorise it."""
    root = tmp_path_factory.mktemp("overfit")
    src = root / "doc.jsonl"
    text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
    src.write_text(json.dumps({"text": text}) + "\n")
    out = root / "tokens"
    tokenize.run(
        src, out, tokenize.TokenizeConfig(tokenizer=str(tokens_dir), val_fraction=0, workers=1)
    )
    return out


@pytest.mark.slow  # 60 optimizer steps
def test_tiny_model_overfits_small_dataset(
    tiny_pretrain, tmp_path: Path, one_doc_tokens: Path
) -> None:
    cfg = tiny_pretrain(
        one_doc_tokens, seq_len=16, max_steps=60, lr=1e-2, batch_tokens=128, micro_batch=8
    )
    m = pretrain.run(tmp_path / "ck", cfg)
    trace = losses(tmp_path / "ck")
    assert trace[1] > 5.5  # ~ln(512) at init
    assert trace[60] < 1.0, trace  # from ~6.2 at init
    assert m.counts == {"steps": 60, "tokens": 60 * 128, "params": m.counts["params"]}
    assert (tmp_path / "ck" / "loss.png").stat().st_size > 1000
    assert not partial_path(tmp_path / "ck").exists()


class Crash(RuntimeError):
    pass


class CrashAt(Silent):
    """Progress that raises after `n` completed steps (a crash between checkpoints)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def advance(self, n: float = 1, **fields: object) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise Crash("simulated crash")


@pytest.mark.slow  # three short training runs
def test_resume_reproduces_uninterrupted_loss_trace(
    tiny_pretrain, tmp_path: Path, tokens_dir: Path
) -> None:
    cfg = tiny_pretrain(tokens_dir, max_steps=10, save_every=4, eval_every=5)
    pretrain.run(tmp_path / "full", cfg)
    with pytest.raises(Crash):
        pretrain.run(
            tmp_path / "cut", cfg, progress=CrashAt(7)
        )  # dies after step 7; checkpoint at 4
    assert not (tmp_path / "cut").exists()
    assert (partial_path(tmp_path / "cut") / "checkpoints" / "step-0000004").is_dir()
    m = pretrain.run(tmp_path / "cut", cfg, resume=True)
    assert m.stats["resumed_from_step"] == 4
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 11))
    for s in range(1, 11):
        assert cut[s] == pytest.approx(full[s], abs=1e-6), s
    a = load_checkpoint(tmp_path / "full").model.state_dict()
    b = load_checkpoint(tmp_path / "cut").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_changed_settings(tiny_pretrain, tmp_path: Path, tokens_dir: Path) -> None:
    cfg = tiny_pretrain(tokens_dir, max_steps=4, save_every=2)
    with pytest.raises(Crash):
        pretrain.run(tmp_path / "r", cfg, progress=CrashAt(3))
    with pytest.raises(ConfigError, match="lr"):
        pretrain.run(
            tmp_path / "r",
            tiny_pretrain(tokens_dir, max_steps=4, save_every=2, lr=1e-4),
            resume=True,
        )


def test_non_finite_loss_stops_and_keeps_last_checkpoint(
    tiny_pretrain, tmp_path: Path, tokens_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = pretrain.lm_loss

    def poisoned(model, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss = real(model, batch)
        return (
            loss * float("nan") if calls["n"] > 6 else loss
        )  # 2 micro-steps per step: step 4 is NaN

    monkeypatch.setattr(pretrain, "lm_loss", poisoned)
    with pytest.raises(
        TrainingError,
        match=r"loss became nan \(grad norm nan\) at step 4; the last good checkpoint is .*step-0000002",
    ):
        pretrain.run(tmp_path / "nan", tiny_pretrain(tokens_dir, max_steps=8, save_every=2))
    assert not (tmp_path / "nan").exists()
    ck = partial_path(tmp_path / "nan") / "checkpoints" / "step-0000002"
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ck).model.state_dict().values())


def test_init_with_a_different_tokenizer_fails_clearly(
    tiny_pretrain, tmp_path: Path, tokens_dir: Path, docs_dir: Path
) -> None:
    pretrain.run(tmp_path / "base", tiny_pretrain(tokens_dir, max_steps=1))
    other = tmp_path / "other"
    tokenize.run(docs_dir, other, tokenize.TokenizeConfig(vocab_size=400, workers=1))
    with pytest.raises(InputError, match="tokenizer .* does not match checkpoint"):
        pretrain.run(
            tmp_path / "cont", tiny_pretrain(other, init=str(tmp_path / "base"), max_steps=1)
        )
    assert not (tmp_path / "cont").exists()
    # Same tokenizer: continued pretraining starts from the checkpoint's weights.
    m = pretrain.run(
        tmp_path / "cont", tiny_pretrain(tokens_dir, init=str(tmp_path / "base"), max_steps=1)
    )
    assert any(i["kind"] == "checkpoint" for i in m.inputs)


def test_mixture_of_two_datasets(
    tiny_pretrain, tmp_path: Path, tokens_dir: Path, one_doc_tokens: Path
) -> None:
    cfg = tiny_pretrain(
        tokens_dir, data=(f"{tokens_dir}=0.7", f"{one_doc_tokens}=0.3"), max_steps=2
    )
    m = pretrain.run(tmp_path / "mix", cfg)
    assert len(m.inputs) == 2
    assert m.counts["steps"] == 2


def test_batch_tokens_must_fill_micro_batches(
    tiny_pretrain, tokens_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="not a multiple"):
        pretrain.run(tmp_path / "x", tiny_pretrain(tokens_dir, batch_tokens=300, max_steps=1))


def test_tokens_auto_is_chinchilla(tiny_pretrain, tokens_dir: Path) -> None:
    from llmctl.core.model import chinchilla_tokens

    cfg = tiny_pretrain(tokens_dir)
    p = pretrain.plan(cfg, 512)
    assert p["steps"] == -(-chinchilla_tokens(p["model"]) // cfg.batch_tokens)


def test_checkpoint_manifest(tiny_pretrain, tmp_path: Path, tokens_dir: Path) -> None:
    pretrain.run(tmp_path / "c", tiny_pretrain(tokens_dir, max_steps=2))
    m = Manifest.read(tmp_path / "c")
    assert m.kind == "checkpoint"
    assert m.stage == "pretrain"
    assert m.config["max_steps"] == 2
    assert m.tokenizer["vocab_size"] == 512
    assert m.stats["unigram_loss_val"] > 0


def test_micro_batch_auto_and_activation_checkpointing_keep_the_trajectory(
    tiny_pretrain, tokens_dir: Path, tmp_path: Path
) -> None:
    """`--micro-batch auto` picks the largest micro-batch that fits (here, the host's memory: the
    whole step of 8 rows) and records the number; with activation checkpointing on and another
    micro-batch the losses are those of the plain run: a step's rows do not depend on the split."""
    ref = pretrain.run(tmp_path / "ref", tiny_pretrain(tokens_dir, max_steps=3, micro_batch=2))
    cfg = tiny_pretrain(tokens_dir, max_steps=3, micro_batch="auto", activation_checkpointing=True)
    m = pretrain.run(tmp_path / "auto", cfg)
    assert m.config["micro_batch"] == 8  # batch_tokens 256 / seq_len 32
    assert m.config["activation_checkpointing"] is True
    a, b = losses(tmp_path / "ref"), losses(tmp_path / "auto")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    assert ref.counts["steps"] == m.counts["steps"] == 3


def test_micro_batch_auto_fits_the_memory_it_is_given(tiny_pretrain, tokens_dir: Path) -> None:
    from llmctl.core import sizing

    cfg = tiny_pretrain(tokens_dir, micro_batch="auto", batch_tokens=32 * 12)
    mcfg = cfg.model_config(512)
    need = {
        mb: sizing.memory(mcfg, "ddp", gpus=1, micro_batch=mb, seq_len=32, act_bytes=4).total
        for mb in (1, 2, 3, 4, 6, 12)
    }
    # Room for 4 rows but not 6: 4 (a divisor of the 12 rows per step), accumulating 3.
    budget = (need[4] + need[6]) / 2 / 0.9
    resolved, line = pretrain.resolve_micro_batch(cfg, mcfg, budget, act_bytes=4)
    assert resolved.micro_batch == 4
    assert "4 rows x 3 accumulation steps" in line
    with pytest.raises(ConfigError, match="even 1 row"):
        pretrain.resolve_micro_batch(cfg, mcfg, need[1] / 2, act_bytes=4)
    with pytest.raises(ConfigError, match="number or 'auto'"):
        tiny_pretrain(tokens_dir, micro_batch="lots")
