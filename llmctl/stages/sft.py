"""sft: conversations + checkpoint -> chat checkpoint. Supervised fine-tuning with loss on the
assistant's tokens only.

Data: core/chatdata.py reads `messages` (or `prompt` + `response`) rows and renders them with the one
chat template; only assistant content and its closing <|end|> are targets. A held-out share of the
conversations (`val_fraction`, chosen by seed) gives the validation loss.

Batches: packed by default: conversations are laid back to back in rows of `seq_len` tokens (in a
seeded order, once), each with its own RoPE positions and a block-diagonal causal mask, so no
conversation attends to another and the result equals training on each alone (property-tested),
without the compute padding wastes. `--no-pack` right-pads one conversation per row instead. Each
epoch visits the rows in a new seeded order, so the batch at step s is a pure function of (seed, s)
and `--resume` reproduces an uninterrupted run. The loss is the mean over the target tokens of each
micro-batch.

LoRA (`--lora-rank R`): the base weights are frozen and rank-R adapters train on the attention and
MLP projections (core/lora.py); checkpoints always hold merged, plain weights (so generate, eval and
later stages load them unchanged); the adapters themselves ride in the trainer state for resume.

Everything else - warmup + cosine schedule, accumulation, clipping, non-finite guard, checkpoints,
metrics.jsonl, loss.png, the `<out>.partial` run directory - is the shared loop of pretrain.

Several processes (`torchrun --nproc_per_node N -m llmctl sft ... --parallel ddp|fsdp`): each rank
trains on its own share of every micro-step's rows (`--micro-batch` per rank, `--batch-size`
global; core/data_parallel.py). Ranks hold different numbers of target tokens, so each rank's
token-mean loss is weighted by its share of the micro-step's target tokens: the update is the one
a single process makes with micro-batch x N rows. LoRA runs under DDP; with FSDP it is refused
(the merge and the adapter state read whole weights, which FSDP keeps sharded). Under FSDP the
model is built on the meta device and each rank reads only its own shards of the `--init` (or
resumed) checkpoint, one tensor at a time (`parallel.materialize`).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from llmctl.core.artifacts import Manifest, input_record, partial_path
from llmctl.core.chatdata import (
    IGNORE,
    Batch,
    Example,
    collate,
    encode_conversations,
    epoch_order,
    load_conversations,
    pack,
)
from llmctl.core.checkpoint import (
    check_checkpoint,
    checkpoint_errors,
    iter_checkpoint_weights,
    iter_weights,
    latest_checkpoint,
    load_checkpoint,
    load_extra_tensors,
    load_trainer_state,
    read_optimizer_state,
    save_checkpoint,
    write_checkpoint_files,
)
from llmctl.core.config import require, to_dict
from llmctl.core.data_parallel import (
    check_resume_rows,
    on_ranks,
    plan_ranks,
    rank_share,
    run_output,
)
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.optim import make_adamw
from llmctl.core.parallel import (
    Parallel,
    build_on_meta,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    materialize,
    wrap,
)
from llmctl.core.plots import plot_metrics
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.train_loop import Schedule, read_metrics, train

# Settings a resumed run must share with the run it resumes.
TRAJECTORY = (
    "data",
    "init",
    "seq_len",
    "pack",
    "batch_size",
    "micro_batch",
    "epochs",
    "max_steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "val_fraction",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "seed",
    "precision",
)


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Settings of `llmctl sft`."""

    data: str = ""  # conversations: Parquet/JSONL/dataset dir with `messages` (or prompt/response)
    init: str = ""  # checkpoint to fine-tune (pretrain output)
    seq_len: int = 512  # tokens per row (conversations longer than this are truncated)
    pack: bool = True  # pack conversations into rows (block-diagonal attention); False = pad
    batch_size: int = 16  # rows per optimizer step
    micro_batch: int = 8  # rows per forward pass
    epochs: float = 3.0  # passes over the training conversations (ignored with max_steps)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 3e-4  # peak learning rate
    min_lr: float | None = None  # cosine floor (default lr / 10)
    warmup_steps: int = 10  # linear warmup (capped at a tenth of the run)
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    val_fraction: float = 0.05  # held-out share of conversations (0 = none)
    eval_every: int = 50  # steps between validation runs (0 = only at the end)
    save_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest intermediate checkpoints kept
    lora_rank: int = 0  # LoRA rank (0 = full fine-tuning)
    lora_alpha: float = 16.0  # LoRA scale numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = ("wqkv", "wo", "w13", "w2")  # layers that get adapters
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 where supported
    compile: bool = False  # torch.compile the model
    parallel: Literal["none", "ddp", "fsdp"] = (
        "none"  # with several processes (torchrun): ddp = replicate, fsdp = shard (ZeRO-3)
    )
    seed: int = 0  # split, packing and batch order

    def __post_init__(self) -> None:
        require(bool(self.data), "no conversations given: pass a dataset with a messages column")
        require(bool(self.init), "no checkpoint given: pass --init CKPT (a pretrain output)")
        require(self.seq_len >= 8, f"--seq-len must be >= 8, got {self.seq_len}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(
            self.micro_batch >= 1 and self.batch_size % self.micro_batch == 0,
            f"--batch-size {self.batch_size} must be a multiple of --micro-batch {self.micro_batch}",
        )
        require(self.epochs > 0, f"--epochs must be > 0, got {self.epochs}")
        require(
            self.max_steps is None or self.max_steps >= 1,
            f"--max-steps must be >= 1, got {self.max_steps}",
        )
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(
            0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"
        )
        require(self.lora_rank >= 0, f"--lora-rank must be >= 0, got {self.lora_rank}")
        require(
            self.parallel in ("none", "ddp", "fsdp"),
            f"--parallel must be none, ddp or fsdp, got {self.parallel!r}",
        )
        if self.lora_rank and self.parallel == "fsdp":
            raise ConfigError(
                "--lora-rank with --parallel fsdp is not supported: merging the adapters and "
                "saving them read whole weights, which FSDP keeps sharded",
                "use --parallel ddp (LoRA's optimizer state is small enough to replicate)",
            )


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded shuffle, the first `fraction` held out (at least one when
    fraction > 0 and there are two or more items)."""
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    k = 0 if fraction <= 0 or n < 2 else max(1, round(n * fraction))
    return sorted(order[k:]), sorted(order[:k])


@dataclass
class _Plan:
    rows: list[
        list[int]
    ]  # example indices per training row (fixed; visited in a new order per epoch)
    steps_per_epoch: int
    steps: int


def plan_rows(examples: list[Example], cfg: SFTConfig) -> _Plan:
    """Training rows and step counts."""
    if cfg.pack:
        order = epoch_order(len(examples), cfg.seed, -1)
        rows = pack([len(e.ids) for e in examples], cfg.seq_len, order)
    else:
        rows = [[i] for i in range(len(examples))]
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    return _Plan(rows, per_epoch, steps)


def step_rows(
    plan: _Plan, cfg: SFTConfig, step: int, micro: int, width: int | None = None
) -> list[list[int]]:
    """The rows of micro-batch `micro` of optimizer step `step`: epoch e visits the rows in a seeded
    order, wrapping around to fill its last step (so every micro-batch is full). `width` is the
    rows of one micro-step over all ranks (default: --micro-batch, one process)."""
    width = width or cfg.micro_batch
    epoch, k = divmod(step, plan.steps_per_epoch)
    order = epoch_order(len(plan.rows), cfg.seed, epoch)
    start = k * cfg.batch_size + micro * width
    return [plan.rows[order[(start + j) % len(order)]] for j in range(width)]


def masked_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the target (assistant) tokens of a batch (the model's fused,
    chunked head: the (rows, vocab) logits are never materialised)."""
    return model(
        batch.ids, positions=batch.positions, attn_mask=batch.attn_mask, targets=batch.targets
    )


def run(
    dst: Path,
    cfg: SFTConfig,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
    runtime: Runtime | None = None,
) -> Manifest:
    """Fine-tune `cfg.init` on `cfg.data` and write the chat checkpoint to `dst`.

    Under torchrun every rank calls this; all return the same manifest, written by rank 0.

    Raises:
        InputError: Bad data or checkpoint; ConfigError: inconsistent settings;
        TrainingError: the loss became non-finite (the last checkpoint stays in `<dst>.partial`).
    """
    dst = Path(dst)
    rt = runtime or Runtime.detect(cfg.device, cfg.precision)
    mode, accum = plan_ranks(cfg.parallel, cfg.batch_size, cfg.micro_batch, rt)
    progress = progress if rt.is_main else SILENT
    return on_ranks(
        dst,
        rt,
        lambda: _run(dst, cfg, rt, mode, accum, force=force, resume=resume, progress=progress),
    )


def _run(
    dst: Path,
    cfg: SFTConfig,
    rt: Runtime,
    mode: Parallel,
    accum: int,
    *,
    force: bool,
    resume: bool,
    progress: Progress,
) -> Manifest:
    torch.manual_seed(cfg.seed)
    # Under FSDP the model is built on the meta device and each rank materialises only its own
    # shards, reading the checkpoint one tensor at a time (core/parallel.py `materialize`).
    meta = mode == "fsdp"
    weights: Iterable[tuple[str, torch.Tensor]] | None = None
    if meta:
        _, mcfg, tok = check_checkpoint(Path(cfg.init))
        model, weights = build_on_meta(mcfg), iter_checkpoint_weights(Path(cfg.init))
    else:
        ckpt = load_checkpoint(Path(cfg.init), device=rt.device)
        model, tok = ckpt.model.train(), ckpt.tokenizer
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"--seq-len {cfg.seq_len} exceeds {cfg.init}'s context ({model.cfg.max_seq_len})",
            f"use --seq-len {model.cfg.max_seq_len} or less",
        )
    convs, src = load_conversations(cfg.data)
    train_idx, val_idx = split(len(convs), cfg.val_fraction, cfg.seed)
    train_ex, truncated = encode_conversations(tok, [convs[i] for i in train_idx], cfg.seq_len + 1)
    val_ex, _ = encode_conversations(tok, [convs[i] for i in val_idx], cfg.seq_len + 1)
    if not train_ex:
        raise InputError(
            f"{cfg.data}: no training conversation keeps an assistant token within --seq-len {cfg.seq_len}",
            "raise --seq-len or check the data",
        )
    plan = plan_rows(train_ex, cfg)
    trainable = _setup_lora(model, cfg)
    inputs = [src.record(), input_record(cfg.init, "checkpoint")]
    start, resumed_from = 0, None
    if resume:  # the weights go into the whole model before it is wrapped, or replace `weights`
        start, resumed_from, resumed = _resume(
            partial_path(dst), cfg, model, rt, into_model=not meta
        )
        weights = resumed or weights
    wrapped = wrap(model, mode, rt)  # FSDP shards `model` in place; DDP returns a wrapper
    if meta:
        with checkpoint_errors(resumed_from or Path(cfg.init)):
            materialize(model, rt.device, state=weights)
    opt = make_adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.95))
    if resumed_from is not None:  # also restores the RNG state
        load_optimizer_state(model, opt, read_optimizer_state(resumed_from))
    with run_output(
        dst, rt, "sft", config=to_dict(cfg), inputs=inputs, force=force, resume=resume, start=start
    ) as out:
        metrics = out.path / "metrics.jsonl"
        schedule = Schedule(
            total_steps=plan.steps,
            grad_accum=accum,
            lr=cfg.lr,
            min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
            warmup_steps=min(cfg.warmup_steps, plan.steps // 10 + 1),
            grad_clip=cfg.grad_clip,
            eval_every=cfg.eval_every,
            save_every=cfg.save_every,
            tokens_per_step=cfg.batch_size * cfg.seq_len,
        )
        seq = cfg.seq_len if cfg.pack else None

        def targets(rows: list[list[int]]) -> int:
            return sum(train_ex[i].n_loss for r in rows for i in r)

        def batch(step: int, micro: int) -> tuple[Batch, float]:
            rows = step_rows(plan, cfg, step, micro, cfg.micro_batch * rt.world_size)
            mine = rank_share(rows, rt)
            b = collate(train_ex, mine, tok.pad_id, seq).to(rt.device)
            if rt.world_size == 1:
                return b, 1.0
            # Gradients are averaged over ranks: weighting each rank's token mean by ranks x its
            # share of the micro-step's target tokens makes the update that of the global mean.
            return b, rt.world_size * targets(mine) / targets(rows)

        def loss_fn(m: torch.nn.Module, mb: tuple[Batch, float]) -> torch.Tensor:
            return masked_lm_loss(m, mb[0]) * mb[1]

        def save(done: int) -> Path:
            path = out.path / "checkpoints" / f"step-{done:07d}"
            state = _checkpoint_state(model, opt, cfg, rt, done)  # collective under FSDP
            if rt.is_main:
                m = Manifest(
                    kind="checkpoint",
                    stage="sft",
                    config=to_dict(cfg),
                    inputs=inputs,
                    counts={"steps": done},
                )
                save_checkpoint(path, model, tok, manifest=m, **state)
                for old in sorted((out.path / "checkpoints").glob("step-*"))[
                    : -cfg.keep_checkpoints
                ]:
                    shutil.rmtree(old, ignore_errors=True)
            return path

        val_rows = (
            pack([len(e.ids) for e in val_ex], cfg.seq_len, range(len(val_ex)))
            if cfg.pack
            else [[i] for i in range(len(val_ex))]
        )

        def evaluate() -> dict[str, float]:
            # Every rank scores every held-out row: under FSDP each forward is a collective.
            total, count = 0.0, 0
            for i in range(0, len(val_rows), cfg.micro_batch):
                b = collate(val_ex, val_rows[i : i + cfg.micro_batch], tok.pad_id).to(rt.device)
                logits = model(b.ids, positions=b.positions, attn_mask=b.attn_mask)
                total += float(
                    F.cross_entropy(
                        logits.float().flatten(0, 1),
                        b.targets.flatten(),
                        ignore_index=IGNORE,
                        reduction="sum",
                    )
                )
                count += b.n_targets
            return {"val_loss": total / max(count, 1)}

        t0 = time.perf_counter()
        train_model = torch.compile(wrapped) if cfg.compile else wrapped
        result = train(
            train_model,
            opt,
            rt,
            schedule,
            start_step=start,
            batch=batch,
            loss_fn=loss_fn,
            save=save,
            evaluate=evaluate if val_ex else None,
            metrics_path=metrics if rt.is_main else None,
            progress=progress,
        )
        state = _checkpoint_state(model, opt, cfg, rt, result.step)
        if not rt.is_main:
            return out.manifest
        write_checkpoint_files(out.path, model, tok, **state)
        plot_metrics(read_metrics(metrics), out.path / "loss.png", title=f"sft {dst.name}")
        out.manifest.tokenizer = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}
        n_loss = sum(e.n_loss for e in train_ex)
        out.manifest.counts = {
            "conversations": len(convs),
            "train_conversations": len(train_ex),
            "val_conversations": len(val_ex),
            "truncated": truncated,
            "rows": len(plan.rows),
            "steps": result.step,
            "assistant_tokens": n_loss,
            "trainable_params": sum(p.numel() for p in trainable),
        }
        out.manifest.stats = {
            "train_loss": round(result.last_loss, 5),
            **{k: round(v, 5) for k, v in (result.last_val or {}).items()},
            "packing_efficiency": round(
                sum(len(e.ids) - 1 for e in train_ex) / (len(plan.rows) * cfg.seq_len), 4
            )
            if cfg.pack
            else None,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "resumed_from_step": start or None,
            "runtime": rt.describe(),
            "model": model.cfg.to_dict(),
        }
    return out.manifest


def _setup_lora(model: torch.nn.Module, cfg: SFTConfig) -> list[torch.nn.Parameter]:
    if not cfg.lora_rank:
        return [p for p in model.parameters() if p.requires_grad]
    from llmctl.core.lora import LoraConfig, apply_lora

    return apply_lora(
        model,
        LoraConfig(
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=tuple(cfg.lora_targets),
        ),
    )


def _checkpoint_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: SFTConfig, rt: Runtime, step: int
) -> dict:
    """The keyword arguments of save_checkpoint / write_checkpoint_files for this step: plain
    (LoRA-merged) weights, the optimizer state as one process holds it, the adapters as extra
    tensors. A collective under FSDP (every rank calls it; rank 0 gets the tensors)."""
    extra = None
    if cfg.lora_rank:  # never sharded (LoRA with FSDP is refused)
        from llmctl.core.lora import lora_state_dict, merged_state_dict

        weights = merged_state_dict(model)
        if model.cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)
        extra = {f"lora.{k}": v for k, v in lora_state_dict(model).items()}
    else:
        weights = full_model_state(model)
    return {
        "weights": weights,
        "optimizer": full_optimizer_state(model, opt),
        "trainer_state": {"step": step, "config": to_dict(cfg), "world_size": rt.world_size},
        "extra_tensors": extra,
    }


def _resume(
    run_dir: Path, cfg: SFTConfig, model: torch.nn.Module, rt: Runtime, *, into_model: bool
) -> tuple[int, Path, Iterable[tuple[str, torch.Tensor]] | None]:
    """Check the run being resumed and load its weights (or adapters) into the unwrapped model
    (`into_model`), or return them to read one tensor at a time into a meta-device model's shards;
    the optimizer is loaded once the model is wrapped. Returns (step, checkpoint, weights)."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise InputError(
            f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}", "run without --resume"
        )
    state = load_trainer_state(ckpt, None)
    saved = state.get("config", {})
    names = {f.name for f in fields(SFTConfig)}
    now = to_dict(cfg)
    # micro_batch is per rank: what fixes a micro-step's rows is micro_batch x ranks (checked next).
    diff = [
        k
        for k in TRAJECTORY
        if k in names and k in saved and k != "micro_batch" and now[k] != saved[k]
    ]
    if diff:
        raise ConfigError(
            f"--resume with different settings than the run being resumed: {', '.join(diff)}",
            f"pass the original flags (they are in {ckpt / 'trainer_state.json'})",
        )
    check_resume_rows(state, cfg.micro_batch, rt)
    if cfg.lora_rank:
        from llmctl.core.lora import load_lora_state_dict

        extra = load_extra_tensors(ckpt)
        load_lora_state_dict(
            model, {k[len("lora.") :]: v for k, v in extra.items() if k.startswith("lora.")}
        )
    elif not into_model:
        check_checkpoint(ckpt)
        return int(state["step"]), ckpt, iter_weights(ckpt)
    else:
        loaded = load_checkpoint(ckpt, device="cpu")
        model.load_state_dict(loaded.model.state_dict())
    return int(state["step"]), ckpt, None
