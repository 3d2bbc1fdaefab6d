"""Data parallelism, applied to a built model from outside; the model itself never knows.

    none  one process; the model as it is
    ddp   DistributedDataParallel: every rank holds the whole model and optimizer, gradients are
          averaged (all-reduce) in buckets during backward
    fsdp  FSDP2 `fully_shard` on every block, then on the root (embedding, final norm, head):
          parameters, gradients and AdamW moments are sharded over the ranks (ZeRO-3); each block's
          weights are all-gathered just before it runs and freed after, gradients reduce-scattered

Both average gradients over ranks, so with each rank's loss the mean over its own rows the update is
the single-process update of the global batch. The model is built whole on every rank from the same
seed before it is sharded, so a run's initial weights do not depend on the number of ranks. Under
FSDP, TP or PP, `pretrain` builds it on the meta device instead (`build_on_meta`), wraps it (or
cuts its pipeline stage), and `materialize`s it: each rank allocates only its shards (or stage) and
fills them from the same whole-model values, one parameter at a time (the initial weights of the
seed, or the checkpoint resumed or started from).

Checkpoints (`core/checkpoint.py`) come in two forms. One file: `full_model_state` and
`full_optimizer_state` gather the state onto rank 0's CPU, `load_optimizer_state` shards it again.
Sharded: `save_sharded` has every rank write its own part with torch.distributed.checkpoint (no
gather: the form for models whose state does not fit one process), `load_sharded_optimizer` reads it
back resharded. Either way a run saved on N ranks resumes on M ranks, or in one process.

Tensor parallel (`tp` > 1, Megatron-style, through `torch.distributed.tensor.parallel`): the ranks
form a 2-D mesh, `dp` data-parallel groups x `tp` ranks (rank = dp_index x tp + tp_index, so a TP
group is `tp` neighbouring ranks: one node's GPUs). The fused projections are split back into
`wq`/`wk`/`wv` and `w1`/`w3` (`unfuse`); in every block q, k, v and the SwiGLU gate and up are split
by columns (each rank computes its own heads and its own d_ff slice, no communication), `wo` and
`w2` by rows (one all-reduce of the block's output each, in forward and in backward). Embedding,
norms and LM head stay whole on every rank of a TP group. FSDP then shards everything over the `dp`
dimension of the mesh (2-D: TP inside a group, ZeRO-3 across groups). All TP ranks of a group read
the same rows. State dicts leave this module in the fused layout (`fuse_state`), so checkpoints do
not depend on `tp`; sharded (DCP) checkpoints keep the unfused names and resume on the same `tp`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llmctl.core import cpu_bf16
from llmctl.core.runtime import Runtime

Parallel = Literal["none", "ddp", "fsdp"]


# Fused parameter -> its parts, in order (rows of the fused weight, top to bottom).
_FUSED = {"attn.wqkv": ("attn.wq", "attn.wk", "attn.wv"), "mlp.w13": ("mlp.w1", "mlp.w3")}
_PART_OF = {part: fused for fused, parts in _FUSED.items() for part in parts}


def unfused_parts(name: str) -> tuple[str, ...] | None:
    """The tensor-parallel layout's names of fused parameter `name`, in row order (None: not
    fused): "layers.0.attn.wqkv.weight" -> the wq, wk, wv weights of layer 0."""
    for fused, parts in _FUSED.items():
        prefix, dot, rest = name.partition(f".{fused}.")
        if dot:
            return tuple(f"{prefix}.{part}.{rest}" for part in parts)
    return None


def data_parallel(world_size: int, tp: int) -> int:
    """Number of data-parallel groups (ranks that read different rows)."""
    return world_size // tp


def data_rank(rank: int, tp: int) -> int:
    """This rank's data-parallel index: the TP ranks of a group share it (and their rows)."""
    return rank // tp


def _mesh(runtime: Runtime, tp: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    dp = data_parallel(runtime.world_size, tp)
    return init_device_mesh(runtime.device.type, (dp, tp), mesh_dim_names=("dp", "tp"))


def wrap(
    model: nn.Module,
    mode: Parallel,
    runtime: Runtime,
    *,
    tp: int = 1,
    checkpointing: bool = False,
) -> nn.Module:
    """The model to train: `model` itself (none, fsdp: sharded in place) or its DDP wrapper.

    In torchtitan's order: `tp` > 1 splits every block over groups of `tp` ranks (in place);
    `checkpointing` makes every block recompute its activations in backward; then `mode` applies
    across the groups (fsdp, or none when there is one group). Under FSDP with bf16 precision the
    gathered weights are bf16 and gradients are reduced in fp32 (`MixedPrecisionPolicy`); the
    sharded master weights and AdamW moments stay fp32. Build the optimizer after this call: TP and
    FSDP replace the parameters with distributed ones.
    """
    dp_mesh = None
    if tp > 1:
        mesh = _mesh(runtime, tp)
        tensor_parallel(model, mesh["tp"])
        dp_mesh = mesh["dp"]
    if checkpointing:
        checkpoint_activations(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # The RoPE tables are buffers derived from the config: identical everywhere, so they are
        # not re-broadcast before every forward.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = (
            dp_mesh
            if dp_mesh is not None
            else init_device_mesh(runtime.device.type, (runtime.world_size,))
        )
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if runtime.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def build_on_meta(cfg: Any) -> nn.Module:
    """The model with its parameters on the meta device: shapes only, no memory, no init. Wrap it
    (`wrap`: TP, FSDP) and then `materialize` it, so each rank only ever allocates its shards."""
    from llmctl.core.model import Transformer

    with torch.device("meta"):
        return Transformer(cfg)


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device,
    *,
    seed: int | None = None,
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
    fill: bool = True,
    partial: bool = False,
    allocate: bool = True,
) -> None:
    """Give a wrapped meta-device model (`build_on_meta`) real storage on `device` and fill it:
    with `state` (a whole, fused-layout state dict, or its (name, tensor) pairs one at a time as
    `checkpoint.iter_weights` reads them: a checkpoint being resumed) or else with the
    initial weights of `seed`, exactly those `Transformer.init_weights(torch.Generator()
    .manual_seed(seed))` gives a whole model. Either way one whole parameter at a time is built on
    the CPU and each rank keeps its own shard of it (no communication: every rank holds the
    same values), so the peak is one parameter plus this rank's shards, and
    the weights do not depend on the number of ranks or on `tp`. Each shard is cut from the
    whole tensor on the CPU, so only the shard is copied to the device. `fill=False` allocates
    the storage and leaves the parameters unset, for a caller that reads every value next
    (`load_sharded_model`: DCP fails on a missing one). `partial`: `model` holds a part of the
    whole model's parameters under the whole model's names (a pipeline stage, `core/pipeline.py`),
    so the values of the others are read (or drawn, to keep the seed's sequence) and dropped; a
    stage with a tied head but no embedding gets the embedding's values as its head.
    `allocate=False`: the storage exists already (a wrapper around `model` is the FSDP root, and
    its `to_empty` was called, which FSDP needs on the root), or the values are being replaced.

    Raises:
        ValueError: `state` names a tensor the model lacks, misses one it has, or a shape differs.
    """

    from llmctl.core.model import Transformer, init_parameter, rope_tables

    cfg = model.cfg
    if allocate:
        model.to_empty(device=device)
    embed, head = getattr(model, "embed", None), getattr(model, "lm_head", None)
    # to_empty from meta makes each module its own weight: tie them again (a whole model's).
    if cfg.tie_embeddings and embed is not None and head is not None:
        head.weight = embed.weight
    cos, sin = rope_tables(cfg)  # on the CPU, as every whole-model path computes them
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    if not fill:
        return
    params = dict(model.named_parameters())  # a tied head is the embedding: one name
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    alias = {}
    if cfg.tie_embeddings and "embed.weight" not in params and "lm_head.weight" in params:
        alias["embed.weight"] = "lm_head.weight"  # a last pipeline stage's copy of the tied head
    if partial:  # every stage checks every tensor, so a bad checkpoint stops all ranks alike
        with torch.device("meta"):
            known = {n: p.shape for n, p in Transformer(cfg).named_parameters()}
        others = set()

    def whole() -> Any:
        if state is not None:
            yield from state.items() if isinstance(state, Mapping) else state
            return
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        with torch.device("meta"):
            shapes = [(n, p.shape) for n, p in Transformer(cfg).named_parameters()]
        for name, shape in shapes:  # init_weights' order, so the same draws
            t = torch.empty(shape)
            init_parameter(cfg, name, t, generator)
            yield name, t

    seen = set()
    for name, full in whole():
        if name in tied:
            continue  # stored once as embed.weight; skipped as load_checkpoint does
        if partial and name not in params and alias.get(name) not in params and name in known:
            if tuple(full.shape) != tuple(known[name]):
                raise ValueError(
                    f"{name} has shape {tuple(full.shape)}, the model's is {tuple(known[name])}"
                )
            others.add(name)
            continue  # another stage's
        name = alias.get(name, name)
        try:
            parts = _split_state({name: full}, model)
        except KeyError:
            raise ValueError(f"{name} is not a parameter of this model") from None
        if name not in params and sum(t.shape[0] for t in parts.values()) != full.shape[0]:
            rows = sum(params[n].shape[0] for n in parts if n in params)
            raise ValueError(f"{name} has {full.shape[0]} rows, the model's is {rows}")
        for pname, part in parts.items():
            if pname not in params:
                raise ValueError(f"{pname} is not a parameter of this model")
            _copy_whole(pname, params[pname], part)
            seen.add(pname)
    missing = [n for n in params if n not in seen]
    if partial:  # the other stages' too, as they check them
        missing += [n for n in known if n not in others and alias.get(n, n) not in params]
    if missing:
        raise ValueError(f"no values for {', '.join(missing)}")


@torch.no_grad()
def fill_parameters(module: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors into `module`'s parameters of the same names, each rank into its own
    shard where they are sharded (a small module beside a `materialize`d model: a scalar head).

    Raises:
        ValueError: The names or a shape differ.
    """
    params = dict(module.named_parameters())
    if set(values) != set(params):
        raise ValueError(f"values for {sorted(values)}, parameters {sorted(params)}")
    for name, p in params.items():
        _copy_whole(name, p, values[name])


def _copy_whole(name: str, p: torch.Tensor, whole: torch.Tensor) -> None:
    """`whole` into parameter `p` (its own block where `p` is a DTensor), shapes checked."""
    from torch.distributed.tensor import DTensor

    if tuple(whole.shape) != tuple(p.shape):  # a DTensor's shape is the global one
        raise ValueError(f"{name} has shape {tuple(whole.shape)}, the model's is {tuple(p.shape)}")
    if isinstance(p, DTensor):
        p.to_local().copy_(_local_block(whole, p))
    else:
        p.copy_(whole)


def _local_block(whole: torch.Tensor, p: Any) -> torch.Tensor:
    """This rank's block of `whole` for the DTensor parameter `p`, cut on the CPU where `whole`
    lives, so only the shard travels to `p`'s device (a GPU never holds the whole tensor)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # an older or newer torch without it: slice on the device instead
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(
            whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None
        )
        return local.to_local()
    shape, offset = compute_local_shape_and_global_offset(whole.shape, p.device_mesh, p.placements)
    block = whole
    for dim, (start, size) in enumerate(zip(offset, shape, strict=True)):
        if size != whole.shape[dim]:
            block = block.narrow(dim, start, size)
    return block


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing: each block keeps only its input for backward and recomputes its
    activations there (about one more forward per step for activations of one block instead of
    all of them). The blocks' `forward` is replaced per instance, so parameter names and
    checkpoints are unchanged; decoding (no grad) runs the plain forward."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    for block in model.layers:

        def forward(*args: Any, _inner: Any = block.forward, **kw: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():
                return _inner(*args, **kw)
            # The recompute restores autocast itself; the bf16-on-CPU mode is re-entered here, or
            # it would save tensors of other shapes than the first pass did.
            ctx = _recompute_in_bf16_mode if cpu_bf16.active() else noop_context_fn
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=ctx, **kw)

        block.forward = forward


def _recompute_in_bf16_mode() -> tuple[Any, Any]:
    return contextlib.nullcontext(), cpu_bf16.matmuls()


def unfuse(model: nn.Module) -> None:
    """Split every block's fused `wqkv` into `wq`, `wk`, `wv` and `w13` into `w1`, `w3`, in place
    and in the same parameter order (the forward accepts both forms)."""
    cfg = model.cfg
    sizes = {
        "attn.wqkv": [cfg.n_heads * cfg.head_dim] + [cfg.n_kv_heads * cfg.head_dim] * 2,
        "mlp.w13": [cfg.d_ff, cfg.d_ff],
    }
    for block in model.layers:
        for fused, parts in _FUSED.items():
            owner_name, name = fused.split(".")
            owner = getattr(block, owner_name)
            if name not in owner._modules:
                continue
            w = owner._modules[name].weight.detach()
            pieces = {}
            for part, rows in zip(parts, w.split(sizes[fused]), strict=True):
                lin = nn.Linear(
                    w.shape[1], rows.shape[0], bias=False, device=w.device, dtype=w.dtype
                )
                lin.weight.data.copy_(rows)
                pieces[part.split(".")[1]] = lin
            rest = {k: v for k, v in owner._modules.items() if k != name}
            owner._modules.clear()
            owner._modules.update({**pieces, **rest})


def tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style TP of every block over `tp_mesh` (see the module docstring)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    # DTensor warns at every 2-D (dp x tp) reduction of a gradient norm or gather of a checkpoint
    # that it runs one collective per mesh dimension: a few scalars or a save, not worth a word.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    unfuse(model)
    col, row = ColwiseParallel(), RowwiseParallel()
    plan = {**dict.fromkeys(_PART_OF, col), "attn.wo": row, "mlp.w2": row}
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)


def _fused_name(name: str) -> tuple[str, int] | None:
    """'layers.3.attn.wk.weight' -> ('layers.3.attn.wqkv.weight', 1); None for unsplit names."""
    for part, fused in _PART_OF.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), _FUSED[fused].index(part)
    return None


def _fused_order(names: list[str]) -> list[str]:
    """Parameter names in a fused model's order: each split group becomes its fused name, once."""
    out = []
    for n in names:
        f = _fused_name(n)
        if f is None or f[1] == 0:
            out.append(n if f is None else f[0])
    return out


def fuse_state(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict (weights, or AdamW's per-parameter {exp_avg, ...}) keyed by unfused names ->
    the fused layout: parts concatenated by rows, in place of the first part. Fused input is
    returned as it is. AdamW's moments are elementwise, so concatenating them is exact."""
    parts: dict[str, dict[int, Any]] = {}
    for k, v in sd.items():
        f = _fused_name(k)
        if f:
            parts.setdefault(f[0], {})[f[1]] = v
    if not parts:
        return sd
    out: dict[str, Any] = {}
    for k, v in sd.items():
        f = _fused_name(k)
        if f is None:
            out[k] = v
        elif f[1] == 0:
            pieces = [parts[f[0]][i] for i in range(len(parts[f[0]]))]
            out[f[0]] = _cat(pieces)
    return out


def _cat(pieces: list[Any]) -> Any:
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces)
    # an optimizer entry: cat the moments, keep the scalars (step) of the first part
    return {k: torch.cat([p[k] for p in pieces]) if v.ndim else v for k, v in pieces[0].items()}


def _split_state(sd: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The inverse of `fuse_state` for `model`'s own (unfused) parameters."""
    names = {n for n, _ in model.named_parameters()}
    sizes = {n: p.shape[0] for n, p in model.named_parameters()}  # a DTensor's global shape
    out = {}
    for k, v in sd.items():
        if k in names:
            out[k] = v
            continue
        stem = next((f for f in _FUSED if f".{f}." in k), None)
        if stem is None:
            out[k] = v
            continue
        offset = 0
        for part in _FUSED[stem]:
            pk = k.replace(f".{stem}.", f".{part}.")
            rows = sizes[pk]
            if isinstance(v, torch.Tensor):
                out[pk] = v[offset : offset + rows]
            else:
                # 0-dim entries (AdamW's step) are copied: shared, each part would advance it
                out[pk] = {
                    m: t[offset : offset + rows] if t.ndim else t.clone() for m, t in v.items()
                }
            offset += rows
    return out


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global L2 norm of `max_norm` (inf: measure only); return the norm.

    Gradients may be plain tensors and DTensors on different meshes (TP blocks on the 2-D mesh,
    embedding and norms on the dp mesh), which torch's `clip_grad_norm_` cannot stack together: the
    norm is taken per group of equal (mesh, placements), each group's made whole (one small
    collective each), and the squares summed."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.placements) if hasattr(g, "device_mesh") else None
            groups.setdefault(key, []).append(p)
    if not groups:
        return 0.0
    if len(groups) == 1:  # one kind of gradient (one process, DDP, FSDP): torch's own
        (ps,) = groups.values()
        n = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        return float(n.full_tensor() if hasattr(n, "full_tensor") else n)
    squares = []
    for ps in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], 2.0)
        squares.append(float(n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2)
    total = math.sqrt(sum(squares))
    scale_to_norm([p for ps in groups.values() for p in ps], max_norm, total)
    return total


def scale_to_norm(params: list[torch.Tensor], max_norm: float, total: float) -> None:
    """Scale gradients whose global norm is `total` down to `max_norm` (as torch computes the
    factor; a Python scalar multiplies plain tensors and DTensors alike)."""
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around forward and backward of a micro-batch: DDP skips its all-reduce unless `sync` (the
    last micro-batch of a step), so accumulation costs one all-reduce per step. FSDP reduce-scatters
    every micro-batch, which keeps gradients sharded (skipping it would hold them unsharded)."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def reshard(model: nn.Module) -> None:
    """Put an FSDP root's sharded parameters back on its modules. The root keeps its weights
    gathered after a forward until the backward, so after a forward without one (evaluation, a
    reference pass) `parameters()` would list the gathered copies: an optimizer built then, or a
    state gathered then, would hold tensors that training no longer updates. No-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def _is_sharded(model: nn.Module) -> bool:
    """FSDP or TP: some parameters are DTensors (state must be gathered collectively)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (a tied head stored once, as `embed.weight`). Under FSDP every rank
    must call this (it all-gathers); the tensors land on rank 0's CPU, other ranks get `{}`."""
    reshard(model)
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(model, options=_full_options())
    else:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if sd and getattr(model.cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return fuse_state(sd)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the index of `opt.state_dict()`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` as one process of the fused model would have it (state keyed by
    parameter index in the fused order, so a TP run's file resumes without TP and back). Under FSDP
    or TP a collective gather: every rank must call it; rank 0 gets the tensors, others `{}`."""
    reshard(model)
    names = _param_names(model, opt)
    split = any(_fused_name(n) for n in names)
    if not _is_sharded(model):
        if not split:
            return opt.state_dict()
        sd = opt.state_dict()
        full = {
            "state": {names[i]: st for i, st in sd["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]
            ],
        }
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(model, opt, options=_full_options())
        if not full.get("state"):
            return {}
    index = {n: i for i, n in enumerate(_fused_order(names))}
    groups, start = [], 0
    for g in full["param_groups"]:
        count = len(_fused_order(g["params"]))
        groups.append({**g, "params": list(range(start, start + count))})
        start += count
    state = fuse_state(full["state"])
    return {"state": {index[n]: st for n, st in state.items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full optimizer state indexed in the fused order (every rank passes the same one);
    FSDP and TP keep only each rank's shard of the moments, an unfused model gets them cut."""
    names = _param_names(model, opt)
    split = any(_fused_name(n) for n in names)
    if not _is_sharded(model) and not split:
        opt.load_state_dict(sd)
        return
    order = _fused_order(names)
    state = _split_state({order[int(i)]: st for i, st in sd["state"].items()}, model)
    if not _is_sharded(model):  # unfused in one process: back to this optimizer's own indices
        own = {n: i for i, n in enumerate(names)}
        groups, it = [], iter(range(len(names)))
        for saved, g in zip(sd["param_groups"], opt.param_groups, strict=True):
            groups.append({**saved, "params": [next(it) for _ in g["params"]]})
        opt.load_state_dict(
            {"state": {own[n]: st for n, st in state.items()}, "param_groups": groups}
        )
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    own_names = {id(p): n for n, p in model.named_parameters()}
    by_name = {
        "state": state,
        "param_groups": [
            {**saved, "params": [own_names[id(p)] for p in g["params"]]}
            for saved, g in zip(sd["param_groups"], opt.param_groups, strict=True)
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


def load_sharded_model(model: nn.Module, directory: Path) -> None:
    """Collective: read the weights of a `save_sharded` directory straight into this run's shards
    of `model` (FSDP/TP, materialised), resharded to its ranks: no rank reads the whole model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])


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
