"""Data parallelism for the post-training stages (sft, rm, dpo, ppo): the plumbing pretrain does
inline.

Under `torchrun --nproc_per_node N -m llmctl sft|rm|dpo ... --parallel ddp|fsdp` every rank runs
the whole stage. Each micro-step of an optimizer step draws `micro_batch x N` rows (or pairs) in
the single-process order and every rank takes its own contiguous share of them (`rank_share`), so
`--micro-batch` is per rank, `--batch-size` is global, and a run on N ranks takes the optimizer
steps of one process with `micro_batch x N` rows per micro-step. The model is wrapped from outside
by `parallel.wrap` (a reward model and DPO's log-prob reader list their decoder's blocks as
`layers`, so FSDP shards those, then the whole module with its heads as the root). Rank 0 alone
writes (`run_output`); the others return the manifest it committed (`on_ranks`). Evaluation runs every
held-out row on every rank: under FSDP each forward is a collective, so all ranks must make the
same calls, and the numbers come out the same everywhere.

Checkpoints are the one-file format, gathered from the shards under FSDP, and record the world
size: a run resumes as long as micro-batch x ranks stays the same (`check_resume_rows`). ppo uses
the rank share, the writer, `cat_over_ranks` and, to keep FSDP's decoding in lockstep, `every_rank`
for its own loop (stages/ppo.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from llmctl.core.artifacts import Manifest, Output, commit_output, partial_path
from llmctl.core.distributed import active, barrier, process_group
from llmctl.core.errors import ConfigError
from llmctl.core.parallel import Parallel, reshard  # noqa: F401 - stages import it from here
from llmctl.core.runtime import Runtime
from llmctl.core.train_loop import truncate_metrics

T = TypeVar("T")


def plan_ranks(
    mode: Parallel, batch_size: int, micro_batch: int, rt: Runtime, unit: str = "rows"
) -> tuple[Parallel, int]:
    """The parallel mode this run uses ("none" in one process) and its micro-steps per optimizer
    step: `batch_size` (global) over micro-batch x ranks. Cheap: stages call it before loading.

    Raises:
        ConfigError: Several processes but no mode (each would train its own copy), or a batch
            size that is not a multiple of micro-batch x ranks.
    """
    if rt.world_size > 1 and mode == "none":
        raise ConfigError(
            f"{rt.world_size} processes but --parallel none: each would train its own copy",
            "pass --parallel ddp (replicated) or --parallel fsdp (sharded)",
        )
    per = micro_batch * rt.world_size
    if batch_size % per:
        raise ConfigError(
            f"--batch-size {batch_size} is not a multiple of --micro-batch x ranks = "
            f"{micro_batch} x {rt.world_size} = {per} {unit}",
            f"use --batch-size {max(per, round(batch_size / per) * per)}",
        )
    return (mode if rt.world_size > 1 else "none"), batch_size // per


def rank_share(items: Sequence[T], rt: Runtime) -> list[T]:
    """This rank's contiguous share of one micro-step's rows (`len(items)` divides evenly)."""
    n = len(items) // rt.world_size
    return list(items[rt.rank * n : (rt.rank + 1) * n])


def cat_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's `t` (one shape on all ranks) concatenated along the last dim, on the CPU; `t`
    itself in one process. Collective: every rank calls it. `device` is where the backend
    exchanges tensors (NCCL: the rank's GPU)."""
    if not active():
        return t
    t = t.to(device).contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=-1).cpu()


def every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (itself in one process). Collective: every rank calls it;
    `device` as in `cat_over_ranks`."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@contextlib.contextmanager
def run_output(
    dst: Path,
    rt: Runtime,
    stage: str,
    *,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    force: bool,
    resume: bool,
    start: int,
) -> Iterator[Output]:
    """A training run's output directory, `<dst>.partial` until it is committed to `dst`.

    Rank 0 writes it (`commit_output`, kept on error for `--resume`, started afresh unless
    resuming), with `checkpoints/` made and `metrics.jsonl` cut back to step `start` on a resume.
    Other ranks get a stand-in `Output` on the same directory, which writes and commits nothing.
    """
    if not rt.is_main:
        yield Output(partial_path(dst), Manifest(kind="checkpoint", stage=stage))
        return
    with commit_output(
        dst,
        kind="checkpoint",
        stage=stage,
        config=config,
        inputs=inputs,
        force=force,
        keep_partial_on_error=True,
        fresh=not resume,
    ) as out:
        (out.path / "checkpoints").mkdir(exist_ok=True)
        if resume:
            truncate_metrics(out.path / "metrics.jsonl", start)
        yield out


def on_ranks(dst: Path, rt: Runtime, body: Callable[[], Manifest]) -> Manifest:
    """Run a stage's body inside the process group (a no-op in one process); every rank returns
    the manifest rank 0 committed to `dst`."""
    with process_group(rt):
        m = body()
        barrier()  # the other ranks read the manifest once rank 0 has renamed the output into place
        return m if rt.is_main else Manifest.read(Path(dst))


def check_resume_rows(state: dict[str, Any], micro_batch: int, rt: Runtime) -> None:
    """A resumed run must draw the rows per micro-step its checkpoint was trained with.

    Args:
        state: The checkpoint's trainer_state.json (`config.micro_batch`, `world_size`).
        micro_batch: This run's --micro-batch.
        rt: This run's runtime.

    Raises:
        ConfigError: micro-batch x ranks differs from the saved run's.
    """
    then_ranks = int(state.get("world_size", 1))
    rows_then = int(state.get("config", {}).get("micro_batch", micro_batch)) * then_ranks
    if rows_then == micro_batch * rt.world_size:
        return
    fix = f"keep micro-batch x ranks = {rows_then}"
    if rows_then % rt.world_size == 0:
        fix += f": --micro-batch {rows_then // rt.world_size}"
    raise ConfigError(
        f"--resume with {rt.world_size} rank(s) x --micro-batch {micro_batch}: the run was saved "
        f"with {then_ranks} x {rows_then // then_ranks} per micro-step",
        fix,
    )
