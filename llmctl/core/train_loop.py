"""The one training loop, shared by pretrain and (later) sft and rm: they differ only in the batch
function and the loss function they pass in.

Per optimizer step: learning rate from a pure function of the step; `grad_accum` micro-batches, each
loss divided by `grad_accum` before backward; gradient-norm clipping; a non-finite loss or gradient
norm stops the run *before* the optimizer step, so the last saved checkpoint is the last good state;
optimizer step; metrics appended to `metrics.jsonl`. A checkpoint is written before any evaluation,
so an evaluation that fails (out of memory, say) never costs trained steps.

Several processes (DDP or FSDP, `core/parallel.py`): every rank runs this same loop on its own rows;
DDP all-reduces gradients only on the last micro-batch of a step, the logged loss is the mean over
ranks, and the gradient norm is the global one, so every rank takes the same stop decision. `save`
and `evaluate` are called on every rank (under FSDP they gather weights); the caller passes
`metrics_path` and a progress reporter on rank 0 only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.core.distributed import active, mean_over_ranks, peer_failed
from llmctl.core.errors import TrainingError
from llmctl.core.optim import lr_at
from llmctl.core.parallel import clip_grad_norm, grad_sync
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime


@dataclass(frozen=True)
class Schedule:
    """Step counts and optimisation knobs the loop needs."""

    total_steps: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    grad_clip: float
    eval_every: int
    save_every: int
    tokens_per_step: int
    flops_per_token: float = 0.0


@dataclass
class LoopResult:
    """What the loop reports at the end."""

    step: int
    last_loss: float
    last_val: dict[str, float] | None
    tokens_per_s: float
    seconds: float


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (missing file: none)."""
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (a resumed run rewrites what came after its checkpoint)."""
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in keep))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    schedule: Schedule,
    *,
    start_step: int,
    batch: Callable[[int, int], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    save: Callable[[int], Path],
    evaluate: Callable[[], dict[str, float]] | None = None,
    metrics_path: Path | None = None,
    progress: Progress = SILENT,
    forward_backward: Callable[[Any, bool], torch.Tensor] | None = None,
    clip: Callable[[list[torch.Tensor], float], float] = clip_grad_norm,
) -> LoopResult:
    """Run optimizer steps `start_step .. total_steps-1`.

    Args:
        model: The (possibly wrapped) model, in train mode.
        optimizer: Its optimizer; the loop sets each group's lr every step.
        runtime: Device and precision.
        schedule: Step counts and knobs.
        start_step: First step to run (0, or the resumed checkpoint's step).
        batch: (step, micro) -> a micro-batch on the device.
        loss_fn: (model, micro-batch) -> mean loss of the micro-batch.
        save: Called with the number of completed steps; writes a checkpoint, returns its path.
        evaluate: Returns validation metrics (e.g. {"val_loss": ...}); runs after the save.
        metrics_path: metrics.jsonl to append to.
        progress: Progress reporter.
        forward_backward: (micro-batch, last micro-batch of the step) -> the detached loss
            divided by grad_accum, gradients accumulated: replaces loss_fn + backward (pipeline
            parallelism runs both through its schedule).
        clip: (parameters, max norm) -> the global gradient norm, gradients clipped.

    Returns:
        The final step, losses and throughput.

    Raises:
        TrainingError: The loss or gradient norm became non-finite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    log = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 - closed in the finally below
    last_loss, last_val = float("nan"), None
    t_start = time.perf_counter()
    tokens_done = 0
    last_saved: Path | None = None
    progress.start("train", schedule.total_steps - start_step, "steps")
    completed, saved_at = (
        start_step,
        start_step,
    )  # steps whose optimizer update is applied / on disk
    try:
        for step in range(start_step, schedule.total_steps):
            t0 = time.perf_counter()
            lr = lr_at(
                step,
                lr=schedule.lr,
                min_lr=schedule.min_lr,
                warmup=schedule.warmup_steps,
                total=schedule.total_steps,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=runtime.device)
            for micro in range(schedule.grad_accum):
                mb = batch(step, micro)
                last_micro = micro == schedule.grad_accum - 1
                if forward_backward is not None:
                    with runtime.autocast():
                        loss_sum += forward_backward(mb, last_micro)
                    continue
                with grad_sync(model, last_micro):
                    with runtime.autocast():
                        loss = loss_fn(model, mb) / schedule.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            max_norm = schedule.grad_clip if schedule.grad_clip > 0 else float("inf")
            norm = clip(params, max_norm)  # global over shards (FSDP, TP) and stages (PP)
            last_loss = float(mean_over_ranks(loss_sum))
            if not (math.isfinite(last_loss) and math.isfinite(norm)):
                where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                raise TrainingError(
                    f"loss became {last_loss} (grad norm {norm}) at step {step + 1}{where}",
                    "lower --lr, raise --warmup-steps or --grad-clip, then --resume",
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            runtime.synchronize()
            dt = time.perf_counter() - t0
            tokens_done += schedule.tokens_per_step
            tps = schedule.tokens_per_step / dt
            done = step + 1
            rec: dict[str, Any] = {
                "step": done,
                "loss": round(last_loss, 5),
                "lr": lr,
                "grad_norm": round(norm, 5),
                "tokens": done * schedule.tokens_per_step,
                "tokens_per_s": round(tps, 1),
                "time": round(time.perf_counter() - t_start, 3),
            }
            peak = runtime.peak_flops()
            if peak and schedule.flops_per_token:
                rec["mfu"] = round(tps * schedule.flops_per_token / (peak * runtime.world_size), 4)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            fields = {"loss": last_loss, "tok/s": tps}
            if "mfu" in rec:
                fields["mfu"] = rec["mfu"]
            progress.advance(1, **fields)
            final = done == schedule.total_steps
            if (schedule.save_every and done % schedule.save_every == 0) or final:
                last_saved, saved_at = save(done), done
            if evaluate is not None and (
                (schedule.eval_every and done % schedule.eval_every == 0) or final
            ):
                model.eval()
                with torch.no_grad(), runtime.autocast():
                    last_val = evaluate()
                model.train()
                if log:
                    log.write(
                        json.dumps({"step": done, **{k: round(v, 5) for k, v in last_val.items()}})
                        + "\n"
                    )
                    log.flush()
                progress.log(
                    f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items())
                )
    except Exception as e:
        if not peer_failed(e):
            raise
        where = f"; the last complete checkpoint is {last_saved}" if last_saved else ""
        raise TrainingError(
            f"another process of this job failed during step {completed + 1}{where}",
            "its own error is above (torchrun names the rank); fix that, then re-run with --resume",
        ) from e
    except KeyboardInterrupt:
        # Keep what was trained: a checkpoint at the last completed step, then let the CLI explain.
        # (Not with several ranks: a save is collective, and the other ranks may be gone already.)
        if completed > saved_at and not active():
            save(completed)
        raise
    finally:
        progress.stop()
        if log:
            log.close()
    seconds = time.perf_counter() - t_start
    return LoopResult(
        schedule.total_steps, last_loss, last_val, tokens_done / max(seconds, 1e-9), seconds
    )
