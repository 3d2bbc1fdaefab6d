"""Data parallelism, applied to a built model from outside; the model itself never knows.

    none  one process; the model as it is
    ddp   DistributedDataParallel: every rank holds the whole model and optimizer, gradients are
          averaged (all-reduce) in buckets during backward
    fsdp  FSDP2 `fully_shard` on every block, then on the root (embedding, final norm, head):
          parameters, gradients and AdamW moments are sharded over the ranks (ZeRO-3); each block's
          weights are all-gathered just before it runs and freed after, gradients reduce-scattered

Both average gradients over ranks, so with each rank's loss the mean over its own rows the update is
the single-process update of the global batch. The model is built whole on every rank from the same
seed before it is sharded, so a run's initial weights do not depend on the number of ranks (a model
too big for one device's memory would be built on the meta device instead: not done yet).

Checkpoints (`core/checkpoint.py`) come in two forms. One file: `full_model_state` and
`full_optimizer_state` gather the state onto rank 0's CPU, `load_optimizer_state` shards it again.
Sharded: `save_sharded` has every rank write its own part with torch.distributed.checkpoint (no
gather: the form for models whose state does not fit one process), `load_sharded_optimizer` reads it
back resharded. Either way a run saved on N ranks resumes on M ranks, or in one process.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmctl.core.runtime import Runtime

Parallel = Literal["none", "ddp", "fsdp"]


def wrap(model: nn.Module, mode: Parallel, runtime: Runtime) -> nn.Module:
    """The model to train: `model` itself (none, fsdp: sharded in place) or its DDP wrapper.

    Build the optimizer after this call: FSDP replaces the parameters with sharded ones.
    """
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # The RoPE tables are buffers derived from the config: identical everywhere, so they are
        # not re-broadcast before every forward.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around forward and backward of a micro-batch: DDP skips its all-reduce unless `sync` (the
    last micro-batch of a step), so accumulation costs one all-reduce per step. FSDP reduce-scatters
    every micro-batch, which keeps gradients sharded (skipping it would hold them unsharded)."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (a tied head stored once, as `embed.weight`). Under FSDP every rank
    must call this (it all-gathers); the tensors land on rank 0's CPU, other ranks get `{}`."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(model, options=_full_options())
    else:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if sd and getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the index of `opt.state_dict()`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` as one process would have it (state keyed by parameter index). Under
    FSDP a collective gather: every rank must call it; rank 0 gets the tensors, others `{}`."""
    if not _is_sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=_full_options())
    if not full.get("state"):
        return {}
    index = {n: i for i, n in enumerate(_param_names(model, opt))}
    groups, start = [], 0
    for g in full["param_groups"]:
        groups.append({**g, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full, index-keyed optimizer state (every rank passes the same one); FSDP keeps only
    each rank's shard of the moments."""
    if not _is_sharded(model):
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, opt)
    by_name = {
        "state": {names[int(i)]: s for i, s in sd["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def save_sharded(model: nn.Module, opt: torch.optim.Optimizer, directory: Path) -> None:
    """Collective: every rank writes its own shards of the weights and optimizer state into
    `directory` (torch.distributed.checkpoint; replicated tensors are written once). Nothing is
    gathered, so it costs no rank more memory than training does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))


def load_sharded_optimizer(model: nn.Module, opt: torch.optim.Optimizer, directory: Path) -> None:
    """Read the optimizer state of a `save_sharded` directory, resharded to this run's ranks (any
    number, one included); the weights are read by `checkpoint.load_checkpoint`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict

    _, osd = get_state_dict(model, opt)
    state = {"optim": osd}
    with warnings.catch_warnings():  # "... assuming ... a single process": a one-process resume
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, opt, state["optim"])
