"""The distributed prologue: torchrun's environment in, a process group up, rank 0 the only writer.

Under `torchrun` (or `accelerate launch`) every process gets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. `launch_env()` reads them (a plain `python` process is rank 0 of 1),
`process_group(runtime)` brings the group up for the length of a stage (gloo on CPU, nccl on CUDA,
each process on its own `cuda:LOCAL_RANK`) and destroys it afterwards. Nothing else in the code base
knows about ranks except through `Runtime` and the three helpers below; the model never does
(`core/parallel.py` wraps it from outside).

Failure: when one process dies, torchrun stops the others and reports the failed rank and its exit
code; the collectives use a finite timeout (`LLMCTL_DIST_TIMEOUT` seconds, default 600) so a
process launched some other way cannot wait forever on a dead peer.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from llmctl.core.runtime import Runtime


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) without one."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def is_main_process() -> bool:
    """True on rank 0 (and in a plain process): the one that prints and writes files."""
    return launch_env()[0] == 0


@contextlib.contextmanager
def process_group(runtime: Runtime) -> Iterator[None]:
    """Initialise the default process group for a multi-process runtime; destroy it on exit.

    A no-op in one process, or when the group is already up (a caller that manages it itself).
    """
    if runtime.world_size <= 1 or dist.is_initialized():
        yield
        return
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(runtime.device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LLMCTL_DIST_TIMEOUT", 600)))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        rank=runtime.rank,
        world_size=runtime.world_size,
        timeout=timeout,
        device_id=runtime.device if cuda else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """A process group with more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself in one process). Sum then divide: gloo has no AVG."""
    if not active():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def peer_failed(e: BaseException) -> bool:
    """Whether a collective failed because another rank went away (gloo: "Connection closed by
    peer"; NCCL: a DistError), rather than because of this rank's own work."""
    if not active():
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or "closed by peer" in text or "Connection reset" in text


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        dist.barrier()
