"""Preference-pair training shared by `rm` and `dpo`: config knobs, held-out split, batches of pairs,
the step -> pairs order, resume, and one run function around core/train_loop.train.

Both stages minimise the same Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), and differ
only in what the reward r of an answer is: a scalar head's output (rm), or the implicit reward
beta * (log pi(answer) - log pi_ref(answer)) of Direct Preference Optimisation (dpo; Rafailov et al.,
2023). So a stage passes a `rewards(model, batch) -> (r_chosen, r_rejected)` function and the code
here does the rest, and reports the same numbers for both: held-out loss, accuracy (fraction of
pairs with r_chosen > r_rejected), mean margin, mean chosen and rejected reward.

A batch of B pairs is 2B right-padded rows, the B chosen answers first, then the B rejected ones
(each row is prompt + answer). It carries the row lengths (the reward model reads the last real
token) and next-token targets that are set only on the answer's loss tokens (DPO sums their
log-probabilities). Which pairs a micro-batch holds is a pure function of (seed, step, micro), so a
resumed run sees exactly the batches an uninterrupted one would.

Several processes (`--parallel ddp|fsdp` under torchrun; core/data_parallel.py): a micro-step draws
micro-batch x ranks pairs in the single-process order and each rank trains on its own share, so the
mean of the ranks' losses (every rank holds as many pairs) is the single-process loss of the global
micro-batch. Held-out scoring runs every pair on every rank; the training-pair metrics are gathered
from all ranks.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.artifacts import Manifest, check_output, partial_path
from llmctl.core.chatdata import (
    IGNORE,
    PairExample,
    Preference,
    encode_preferences,
    epoch_order,
    load_preferences,
)
from llmctl.core.checkpoint import latest_checkpoint, load_trainer_state, read_optimizer_state
from llmctl.core.config import require, to_dict
from llmctl.core.data_parallel import (
    cat_over_ranks,
    check_resume_rows,
    on_ranks,
    plan_ranks,
    rank_share,
    reshard,
    run_output,
)
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.optim import make_adamw
from llmctl.core.parallel import (
    Parallel,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    wrap,
)
from llmctl.core.plots import plot_metrics
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.tokenizer import Tokenizer
from llmctl.core.train_loop import Schedule, read_metrics, train

# Settings that do not change the trajectory: a resumed run may differ in these (micro_batch is
# per rank: micro-batch x ranks must stay, checked separately).
FREE_ON_RESUME = (
    "device",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "parallel",
    "micro_batch",
)


@dataclass(frozen=True, kw_only=True)
class PairTrainConfig:
    """Knobs shared by the preference-pair stages (rm, dpo)."""

    data: str = ""  # preference pairs: Parquet/JSONL file or directory, or a docs dataset
    init: str | None = None  # checkpoint to start from (an SFT or base model); required
    val_fraction: float = 0.1  # share of pairs held out (grouped by prompt; 0 = none)
    epochs: float = 1.0  # passes over the training pairs (unless --max-steps)
    max_steps: int | None = None  # optimizer steps; overrides --epochs
    batch_size: int = 32  # pairs per optimizer step, all ranks together
    micro_batch: int = 8  # pairs per forward pass on each rank (2x rows: chosen and rejected)
    max_len: int = 512  # tokens of prompt + answer (the prompt keeps at most its last half)
    lr: float = 1e-5  # peak learning rate
    min_lr: float | None = None  # floor of the cosine decay (default lr / 10)
    warmup_steps: int = 10  # linear warmup steps (capped at a tenth of the run)
    weight_decay: float = 0.0  # AdamW decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    save_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest intermediate checkpoints kept
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 where supported
    parallel: Literal["none", "ddp", "fsdp"] = (
        "none"  # with several processes (torchrun): ddp = replicate, fsdp = shard (ZeRO-3)
    )
    seed: int = 0  # head initialisation, held-out split and pair order

    def __post_init__(self) -> None:
        require(bool(self.data), "no preference data: pass a file or directory of pairs")
        require(bool(self.init), "--init is required: the SFT (or base) checkpoint to start from")
        require(
            0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"
        )
        require(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        require(
            self.max_steps is None or self.max_steps >= 1,
            f"--max-steps must be >= 1, got {self.max_steps}",
        )
        require(self.micro_batch >= 1, f"--micro-batch must be >= 1, got {self.micro_batch}")
        require(
            self.batch_size >= self.micro_batch and self.batch_size % self.micro_batch == 0,
            f"--batch-size {self.batch_size} must be a multiple of --micro-batch {self.micro_batch}",
        )
        require(self.max_len >= 8, f"--max-len must be >= 8, got {self.max_len}")
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        require(
            self.parallel in ("none", "ddp", "fsdp"),
            f"--parallel must be none, ddp or fsdp, got {self.parallel!r}",
        )
        require(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}",
        )


# -- data -------------------------------------------------------------------------------------


def split_heldout(
    prefs: Sequence[Preference], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of training and held-out pairs. Pairs that share a prompt stay on one side (datasets
    like UltraFeedback hold several pairs per prompt), so held-out accuracy is on unseen prompts.

    Returns:
        (train indices, held-out indices), each in input order.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prefs):
        groups.setdefault(json.dumps(p.prompt, sort_keys=True), []).append(i)
    keys = list(groups)
    random.Random(f"{seed}:heldout").shuffle(keys)
    want = round(len(prefs) * val_fraction)
    if val_fraction > 0 and len(keys) > 1:
        want = max(1, want)
    val: list[int] = []
    for k in keys:
        if len(val) >= want or len(val) + len(groups[k]) >= len(prefs):
            continue
        val += groups[k]
    held = set(val)
    return [i for i in range(len(prefs)) if i not in held], sorted(val)


@dataclass
class PairData:
    """Tokenised pairs split for training. `*_ref` hold per-pair reference log-probs (n, 2) for DPO."""

    train: list[PairExample]
    val: list[PairExample]
    counts: dict[str, int]
    input: dict[str, Any]
    train_ref: torch.Tensor | None = None
    val_ref: torch.Tensor | None = None


def load_pair_data(cfg: PairTrainConfig, tokenizer: Tokenizer, max_seq_len: int) -> PairData:
    """Read, tokenise (to min(--max-len, the model's context)) and split the preference pairs.

    Raises:
        InputError: Unreadable or malformed pairs (see chatdata.load_preferences), or no pairs left
            for training.
    """
    prefs, src = load_preferences(cfg.data)
    pairs, truncated = encode_preferences(tokenizer, prefs, min(cfg.max_len, max_seq_len))
    tr, va = split_heldout(prefs, cfg.val_fraction, cfg.seed)
    if not tr:
        raise InputError(f"{cfg.data}: no pairs left for training", "lower --val-fraction")
    counts = {
        "pairs": len(pairs),
        "train_pairs": len(tr),
        "val_pairs": len(va),
        "truncated": truncated,
    }
    return PairData([pairs[i] for i in tr], [pairs[i] for i in va], counts, src.record())


@dataclass
class PairBatch:
    """B preference pairs as 2B right-padded rows: chosen rows [0, B), rejected rows [B, 2B).

    ids: (2B, T) prompt + answer, then padding. lengths: (2B,) real tokens per row.
    targets: (2B, T) the next token where it is an answer loss token, else IGNORE.
    ref: (2B,) reference log-probs of each row's answer (DPO), or None.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    ref: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        """B."""
        return self.ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        """The batch on `device`."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PairBatch(mv(self.ids), mv(self.lengths), mv(self.targets), mv(self.ref))  # type: ignore[arg-type]


def collate_pairs(
    pairs: Sequence[PairExample], pad_id: int, ref: torch.Tensor | None = None
) -> PairBatch:
    """Stack pairs into one batch (see PairBatch); `ref` is (B, 2) chosen/rejected log-probs."""
    rows = [(p.prompt + p.chosen, [False] * len(p.prompt) + p.chosen_mask) for p in pairs]
    rows += [(p.prompt + p.rejected, [False] * len(p.prompt) + p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, (r, m) in enumerate(rows):
        x = torch.tensor(r, dtype=torch.long)
        ids[b, : len(r)] = x
        # Position t predicts token t + 1; only answer tokens (content and <|end|>) are scored.
        keep = torch.tensor(m[1:], dtype=torch.bool)
        tgt[b, : len(r) - 1] = torch.where(keep, x[1:], IGNORE)
    lengths = torch.tensor([len(r) for r, _ in rows], dtype=torch.long)
    flat_ref = None if ref is None else torch.cat([ref[:, 0], ref[:, 1]])
    return PairBatch(ids, lengths, tgt, flat_ref)


def pair_indices(
    step: int, micro: int, *, micro_batch: int, grad_accum: int, n: int, seed: int
) -> list[int]:
    """Which training pairs (indices into n) micro-batch `micro` of optimizer step `step` holds.

    Pairs are visited epoch after epoch, each epoch in its own seeded order (`epoch_order`).
    """
    first = (step * grad_accum + micro) * micro_batch
    out = []
    for k in range(first, first + micro_batch):
        epoch, at = divmod(k, n)
        out.append(_order(n, seed, epoch)[at])
    return out


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        if len(_ORDERS) > 4:
            _ORDERS.clear()
        _ORDERS[key] = epoch_order(n, seed, epoch)
    return _ORDERS[key]


def chunks(
    pairs: Sequence[PairExample], size: int, pad_id: int, ref: torch.Tensor | None = None
) -> Iterator[PairBatch]:
    """Batches of `size` pairs, in order (evaluation, reference log-probs)."""
    for i in range(0, len(pairs), size):
        r = None if ref is None else ref[i : i + size]
        yield collate_pairs(pairs[i : i + size], pad_id, r)


# -- training ---------------------------------------------------------------------------------

Rewards = Callable[[nn.Module, PairBatch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PairStage:
    """What a pair-training stage plugs into `train_pairs`.

    model: the trained module (all its parameters with requires_grad go to the optimizer), built
        around a decoder whose blocks it lists as `layers` (`parallel.wrap` shards each for FSDP).
    rewards: (model, batch) -> (r_chosen, r_rejected), each (B,) fp32.
    save: (path, manifest, state) -> writes a checkpoint atomically. `state` holds `weights`
        (`model`'s whole state dict, gathered from the ranks), `optimizer` (its state as one process
        holds it) and `trainer_state`.
    write_files: (directory, state) -> the final checkpoint's files (no manifest).
    load_weights: copy weights from a checkpoint into `model` (resume).
    materialize: for a `model` built on the meta device (FSDP): called once it is wrapped, with
        the checkpoint being resumed (or None), to allocate this rank's shards and fill them
        (`parallel.materialize`); `load_weights` is then not used.
    """

    name: str
    model: nn.Module
    tokenizer: Tokenizer
    rewards: Rewards
    save: Callable[[Path, Manifest, dict[str, Any]], Any]
    write_files: Callable[[Path, dict[str, Any]], Any]
    load_weights: Callable[[Path], None]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    materialize: Callable[[Path | None], None] | None = None


def pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair: -log sigmoid(r_c - r_r)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor, prefix: str) -> dict[str, float]:
    """Loss, accuracy, margin and mean rewards of scored pairs."""
    if rc.numel() == 0:
        return {}
    return {
        f"{prefix}loss": float(pair_loss(rc, rr).mean()),
        f"{prefix}accuracy": float((rc > rr).float().mean()),
        f"{prefix}margin": float((rc - rr).mean()),
        f"{prefix}chosen_reward": float(rc.mean()),
        f"{prefix}rejected_reward": float(rr.mean()),
    }


@torch.no_grad()
def score_pairs(
    stage: PairStage,
    pairs: Sequence[PairExample],
    ref: torch.Tensor | None,
    size: int,
    rt: Runtime,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of every pair, in eval mode (restores the previous mode)."""
    was = stage.model.training
    stage.model.eval()
    rcs, rrs = [], []
    with rt.autocast():
        for b in chunks(pairs, size, stage.tokenizer.pad_id, ref):
            rc, rr = stage.rewards(stage.model, b.to(rt.device))
            rcs.append(rc.float().cpu())
            rrs.append(rr.float().cpu())
    stage.model.train(was)
    return torch.cat(rcs), torch.cat(rrs)


def total_steps(n_train: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a run: `max_steps`, else enough steps for `epochs` passes over the pairs."""
    return max_steps or max(1, math.ceil(epochs * n_train / batch_size))


def train_pairs(
    dst: Path,
    cfg: PairTrainConfig,
    data: PairData,
    stage: PairStage,
    rt: Runtime,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Train `stage.model` on preference pairs and commit the final checkpoint to `dst`.

    Layout as in pretrain: `<dst>.partial/` holds `checkpoints/step-N/` and `metrics.jsonl` while
    training; the final checkpoint, `loss.png` and the manifest land in `dst`. Under torchrun every
    rank calls this; all return the manifest rank 0 wrote.

    Raises:
        InputError / ConfigError: nothing to resume, or resuming with other settings; several
            processes without a parallel mode, or a batch size they do not divide.
        TrainingError: the loss became non-finite.
    """
    dst = Path(dst)
    mode, accum = plan_ranks(cfg.parallel, cfg.batch_size, cfg.micro_batch, rt, "pairs")
    progress = progress if rt.is_main else SILENT
    return on_ranks(
        dst,
        rt,
        lambda: _train_pairs(dst, cfg, data, stage, rt, mode, accum, force, resume, progress),
    )


def _train_pairs(
    dst: Path,
    cfg: PairTrainConfig,
    data: PairData,
    stage: PairStage,
    rt: Runtime,
    mode: Parallel,
    accum: int,
    force: bool,
    resume: bool,
    progress: Progress,
) -> Manifest:
    conf = to_dict(cfg)
    start, ckpt = 0, None
    if resume:  # the weights go into the whole model before it is wrapped, or materialise
        start, ckpt = resume_point(partial_path(dst), conf, rt)
        if stage.materialize is None:
            stage.load_weights(ckpt)
    module = stage.model
    wrapped = wrap(module, mode, rt)  # FSDP shards `module` in place; DDP returns a wrapper
    if stage.materialize is not None:
        stage.materialize(ckpt)
        reshard(module)  # after dpo's reference pass: the optimizer must get the sharded weights
    opt = make_adamw(module, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if ckpt is not None and (opt_state := read_optimizer_state(ckpt)) is not None:
        load_optimizer_state(module, opt, opt_state)  # read_optimizer_state restored the RNG
    steps = total_steps(len(data.train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    pad = stage.tokenizer.pad_id
    mean_tokens = sum(
        2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in data.train
    ) / len(data.train)
    inputs = [data.input, *stage.inputs]
    running: list[torch.Tensor] = []  # (2, B) rewards of this rank's pairs since the last eval

    def state(done: int) -> dict[str, Any]:
        """What a checkpoint holds (a collective under FSDP: rank 0 gets the tensors)."""
        return {
            "weights": full_model_state(module),
            "optimizer": full_optimizer_state(module, opt),
            "trainer_state": {"step": done, "config": conf, "world_size": rt.world_size},
        }

    with run_output(
        dst, rt, stage.name, config=conf, inputs=inputs, force=force, resume=resume, start=start
    ) as out:
        metrics = out.path / "metrics.jsonl"
        val_ref = data.val_ref
        init_val = (
            pair_metrics(*score_pairs(stage, data.val, val_ref, cfg.micro_batch, rt), "val_")
            if data.val and not resume
            else {}
        )
        reshard(module)  # that forward left FSDP's root parameters gathered

        def batch(step: int, micro: int) -> PairBatch:
            every_rank = pair_indices(
                step,
                micro,
                micro_batch=cfg.micro_batch * rt.world_size,
                grad_accum=accum,
                n=len(data.train),
                seed=cfg.seed,
            )
            idx = rank_share(every_rank, rt)
            ref = None if data.train_ref is None else data.train_ref[idx]
            return collate_pairs([data.train[i] for i in idx], pad, ref).to(rt.device)

        def loss_fn(model: nn.Module, b: PairBatch) -> torch.Tensor:
            rc, rr = stage.rewards(model, b)
            running.append(torch.stack([rc.detach().float(), rr.detach().float()]).cpu())
            return pair_loss(rc, rr).mean()

        def save(done: int) -> Path:
            path = out.path / "checkpoints" / f"step-{done:07d}"
            st = state(done)
            if not rt.is_main:
                return path
            m = Manifest(
                kind="checkpoint",
                stage=stage.name,
                config=conf,
                inputs=inputs,
                counts={"steps": done},
            )
            stage.save(path, m, st)
            for old in sorted((out.path / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            return path

        def train_metrics() -> dict[str, float]:
            if not running:
                return {}
            r = cat_over_ranks(torch.cat(running, dim=1), rt.device)
            running.clear()
            res = pair_metrics(r[0], r[1], "train_")
            res.pop("train_loss", None)  # the loop logs the per-step loss already
            return res

        def evaluate() -> dict[str, float]:
            res = train_metrics()
            if data.val:
                res.update(
                    pair_metrics(
                        *score_pairs(stage, data.val, val_ref, cfg.micro_batch, rt), "val_"
                    )
                )
            return res

        schedule = Schedule(
            total_steps=steps,
            grad_accum=accum,
            lr=cfg.lr,
            min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
            warmup_steps=min(cfg.warmup_steps, steps // 10 + 1),
            grad_clip=cfg.grad_clip,
            eval_every=cfg.eval_every,
            save_every=cfg.save_every,
            tokens_per_step=round(mean_tokens * cfg.batch_size),
        )
        t0 = time.perf_counter()
        module.train()
        result = train(
            wrapped,
            opt,
            rt,
            schedule,
            start_step=start,
            batch=batch,
            loss_fn=loss_fn,
            save=save,
            evaluate=evaluate,
            metrics_path=metrics if rt.is_main else None,
            progress=progress,
        )
        module.eval()
        final = state(result.step)
        if not rt.is_main:
            return out.manifest
        stage.write_files(out.path, final)
        plot_metrics(read_metrics(metrics), out.path / "loss.png", title=f"{stage.name} {dst.name}")
        out.manifest.tokenizer = {
            "fingerprint": stage.tokenizer.fingerprint,
            "vocab_size": stage.tokenizer.vocab_size,
        }
        out.manifest.counts = {
            **data.counts,
            "steps": result.step,
            "pairs_seen": result.step * cfg.batch_size,
        }
        last = result.last_val or {}
        out.manifest.stats = {
            "train_loss": round(result.last_loss, 5),
            **{k: round(v, 5) for k, v in last.items()},
            **{f"{k}_init": round(v, 5) for k, v in init_val.items()},
            "train_seconds": round(time.perf_counter() - t0, 2),
            "resumed_from_step": start if resume else None,
            "runtime": rt.describe(),
        }
    return out.manifest


def resume_point(run_dir: Path, config: dict[str, Any], rt: Runtime) -> tuple[int, Path]:
    """Find the newest checkpoint of an interrupted run and check the run's settings match (the
    caller loads the weights and, once the model is wrapped, the optimizer from the returned path).

    Returns:
        (completed steps, checkpoint path).

    Raises:
        InputError: Nothing to resume. ConfigError: a setting that changes the trajectory differs.
    """
    ckpt = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if ckpt is None:
        raise InputError(
            f"nothing to resume: no checkpoint in {Path(run_dir) / 'checkpoints'}",
            "run without --resume",
        )
    state = load_trainer_state(ckpt, None)
    saved = state.get("config", {})
    diff = [
        k for k, v in config.items() if k not in FREE_ON_RESUME and k in saved and saved[k] != v
    ]
    if diff:
        raise ConfigError(
            f"--resume with different settings than the run being resumed: {', '.join(diff)}",
            f"pass the original flags (they are in {ckpt / 'trainer_state.json'})",
        )
    check_resume_rows(state, config["micro_batch"], rt)
    return int(state["step"]), ckpt


def start_checks(dst: Path, force: bool, resume: bool) -> None:
    """Fail fast on an existing output before any model is loaded."""
    if not resume:
        check_output(dst, force)
