"""Pipeline parallelism (`pretrain --pp P`) through `torch.distributed.pipelining`.

The model is built on the meta device on every rank (`parallel.build_on_meta`), then each rank
keeps one stage and materialises only that stage's parameters (`parallel.materialize(partial=True)`:
the seed's values, or the checkpoint's, so its initial weights do not depend on P): consecutive blocks, an equal share each (the first stages take
one more when P does not divide n_layers), the first stage also the token embedding, the last the
final norm and the LM head. A micro-batch of `--micro-batch` rows goes through the pipeline as
`--pp-chunks` chunks on a GPipe or 1F1B schedule (`--pp-schedule`); the loss is computed on the last
stage with the fused LM head + cross entropy (`losses.linear_cross_entropy`, as without PP), each
chunk's loss scaled by its share of the step (1 / (chunks x accumulation steps)), so a step's
update is the single-process one.

A tied LM head lives on the first stage (embedding) and on the last (head): the two copies get the
sum of both gradients (one all-reduce between the two ranks per step, as Megatron's embedding group
does) and take the same AdamW step, so they stay equal. The gradient norm is summed over stages,
the tied weight counted once.

State leaves the pipeline whole: `full_model_state` and `full_optimizer_state` gather every stage's
part on rank 0 (one-file checkpoints in the single-process layout, so a PP run resumes with another
P, or in one process); `load_optimizer_state` keeps each stage's own entries.

With world size P x D the ranks form a (dp, pp) mesh: D pipelines, each reading its own rows of
every step, whose same stages average their gradients once per step (one flat all-reduce over the
dp dimension). Scope: no TP or FSDP with PP, no sharded checkpoints, no `--compile`; pretrain only.
Stages exchange activations of a fixed shape, so validation runs whole micro-batches of windows.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from llmctl.core.losses import linear_cross_entropy
from llmctl.core.model import Transformer
from llmctl.core.optim import param_groups
from llmctl.core.parallel import checkpoint_activations, scale_to_norm

PPSchedule = Literal["gpipe", "1f1b"]


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The blocks of `stage`: equal shares, the first `n_layers % pp` stages one more."""
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class Stage(nn.Module):
    """One pipeline stage of a `Transformer`: its blocks, plus the embedding (first stage) or the
    final norm and LM head (last stage). Parameter names are the whole model's."""

    def __init__(self, model: Transformer, index: int, pp: int) -> None:
        super().__init__()
        self.cfg, self.index, self.pp = model.cfg, index, pp
        self.is_first, self.is_last = index == 0, index == pp - 1
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleDict(
            {str(i): model.layers[i] for i in stage_layers(model.cfg.n_layers, pp, index)}
        )
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (first stage) or the residual stream in; the residual stream (or, on the last
        stage, the final normed hidden states) out."""
        if self.embed is not None:
            x = self.embed(x)
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for i, layer in self.layers.items():
            x = layer(x, cos, sin, None, int(i), None)
        return self.norm(x) if self.norm is not None else x

    def tied_here(self) -> bool:
        """Whether this stage holds a copy of a tied embedding/head (with another stage)."""
        return self.cfg.tie_embeddings and self.pp > 1 and (self.is_first or self.is_last)


class Pipeline:
    """This rank's stage of `model`, the schedule that runs it and the collectives around them."""

    def __init__(
        self,
        model: Transformer,
        *,
        pp: int,
        rank: int,
        device: torch.device,
        chunks: int,
        schedule: PPSchedule,
        grad_accum: int,
        checkpointing: bool = False,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.pp, self.rank = pp, rank
        # Ranks form a (dp, pp) mesh: rank = replica x pp + stage. Each replica is one pipeline;
        # the same stage of every replica averages its gradients over the dp dimension.
        self.dp = dist.get_world_size() // pp
        self.replica, index = divmod(rank, pp)
        mesh = init_device_mesh(device.type, (self.dp, pp), mesh_dim_names=("dp", "pp"))
        self.pp_group = mesh["pp"].get_group()
        self.dp_group = mesh["dp"].get_group() if self.dp > 1 else None
        self.last_rank = self.replica * pp + pp - 1  # this pipeline's last stage (global rank)
        # The whole model's parameter order (the optimizer's, in one process) and group sizes.
        names = {
            id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))
        }
        groups = param_groups(model, 0.0)
        self.order = [names[id(p)] for g in groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in groups]
        if checkpointing:
            checkpoint_activations(model)
        self.stage = Stage(model, index, pp)
        # Drop what other stages hold (on the meta device: never allocated).
        for i in range(model.cfg.n_layers):
            if str(i) not in self.stage.layers:
                model.layers[i] = nn.Identity()
        # Embedding groups: each pipeline's first and last ranks (every rank creates all of them).
        self.tied_group = None
        if model.cfg.tie_embeddings and pp > 1:
            for r in range(self.dp):
                group = dist.new_group([r * pp, r * pp + pp - 1])
                if r == self.replica:
                    self.tied_group = group
        self.grad_accum = grad_accum
        self.device = device
        self._pipe_stage = PipelineStage(self.stage, index, pp, device, group=self.pp_group)
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        # Not the schedule's own scaling: it divides the whole .grad after every step, which would
        # shrink again what earlier micro-batches of an accumulation had added.
        self.chunks = chunks
        self.schedule = cls(
            self._pipe_stage, n_microbatches=chunks, loss_fn=self._loss, scale_grads=False
        )

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self.stage.lm_head is not None
        scale = self.grad_accum * self.chunks  # each chunk's share of the step's mean loss
        return linear_cross_entropy(hidden, self.stage.lm_head.weight, target) / scale

    def _run(self, train: bool, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One pass of a micro-batch (with backward when `train`); its loss divided by grad_accum
        (the sum of the scaled chunk losses), on every rank, broadcast from the last stage."""
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        if self.stage.is_first:
            run(x)
        elif self.stage.is_last:
            run(target=y, losses=losses)
        else:
            run()
        loss = (
            torch.stack([v.detach().float() for v in losses]).sum()
            if losses
            else torch.zeros((), device=x.device)
        )
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)
        return loss

    def forward_backward(
        self, batch: tuple[torch.Tensor, torch.Tensor], sync: bool
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch through the pipeline (for the training loop);
        on the step's last micro-batch (`sync`) the tied copies exchange gradients and, with
        several pipelines, each stage's gradients are averaged over them (one flat all-reduce)."""
        loss = self._run(True, *batch)
        if not sync:
            return loss
        if self.stage.tied_here():
            w = self.stage.embed.weight if self.stage.is_first else self.stage.lm_head.weight
            if w.grad is not None:
                dist.all_reduce(w.grad, group=self.tied_group)
        if self.dp_group is not None:
            grads = [p.grad for p in self.stage.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads]) / self.dp  # gloo has no AVG
            dist.all_reduce(flat, group=self.dp_group)
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))
        return loss

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a micro-batch, forward only (validation); every rank gets it."""
        return self._run(False, x, y) * self.grad_accum

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Global gradient norm over all stages (the tied weight once), clipped to `max_norm`."""
        skip = self.stage.lm_head.weight if self.stage.is_last and self.stage.tied_here() else None
        grads = [p.grad for p in params if p.grad is not None and p is not skip]
        local = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros(())
        sq = (local.float() ** 2).reshape(1)
        dist.all_reduce(sq, group=self.pp_group)  # replicas hold equal (averaged) gradients
        total = math.sqrt(float(sq))
        scale_to_norm(params, max_norm, total)
        return total

    # -- state, gathered on rank 0 ------------------------------------------------------------

    def _gather(self, obj: Any) -> list[Any]:
        """Every stage's small `obj` (names, hyper-parameters) of the first pipeline on rank 0 (in
        stage order), `[]` elsewhere; the other pipelines hold the same state and send nothing."""
        if self.replica != 0:
            return []
        out: list[Any] | None = [None] * self.pp if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.pp_group)
        return out or []

    def _gather_tensors(self, own: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every stage's tensors of the first pipeline on rank 0's CPU (in stage order), `[]`
        elsewhere. Names, shapes and dtypes travel as objects; each tensor is then sent on its
        own (`send`/`recv`, on the GPU under NCCL), so rank 0 holds the state once plus one
        tensor in transit, not every stage's state pickled and unpickled again."""
        meta = self._gather([(k, tuple(v.shape), v.dtype) for k, v in own.items()])
        if self.replica != 0:
            return []
        wire = self.device if dist.get_backend(self.pp_group) == "nccl" else torch.device("cpu")
        if self.rank != 0:
            for t in own.values():
                dist.send(t.detach().to(wire).contiguous(), dst=0, group=self.pp_group)
            return []
        parts = [{k: v.detach().cpu() for k, v in own.items()}]
        for src in range(1, self.pp):
            part = {}
            for name, shape, dtype in meta[src]:
                buf = torch.empty(shape, dtype=dtype, device=wire)
                dist.recv(buf, src=src, group=self.pp_group)
                part[name] = buf.cpu()
            parts.append(part)
        return parts

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Every stage's weights on rank 0 (others `{}`), tied head dropped as in one process."""
        parts = self._gather_tensors(self.stage.state_dict())
        sd: dict[str, torch.Tensor] = {}
        for part in parts:
            sd.update(part)
        if sd and self.stage.cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def _names(self, opt: torch.optim.Optimizer) -> list[str]:
        names = {id(p): n for n, p in self.stage.named_parameters()}
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]

    def full_optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """AdamW state as one process of the whole model would have it, on rank 0."""
        sd = opt.state_dict()
        names = self._names(opt)
        flat = {f"{names[i]}\0{k}": v for i, st in sd["state"].items() for k, v in st.items()}
        parts = self._gather_tensors(flat)
        groups_of = self._gather(sd["param_groups"])
        if not parts:
            return {}
        by_name: dict[str, Any] = {}
        for part in parts:
            for key, v in part.items():
                name, k = key.split("\0")
                by_name.setdefault(name, {})[k] = v
        index = {n: i for i, n in enumerate(self.order)}
        groups, start = [], 0
        for size, g in zip(self.group_sizes, groups_of[0], strict=True):
            groups.append({**g, "params": list(range(start, start + size))})
            start += size
        return {
            "state": {index[n]: st for n, st in by_name.items() if n in index},
            "param_groups": groups,
        }

    def load_optimizer_state(self, opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
        """Keep this stage's entries of a whole-model optimizer state."""
        names = self._names(opt)
        full = {self.order[int(i)]: st for i, st in sd["state"].items()}
        if self.stage.tied_here():
            full["lm_head.weight"] = full.get("embed.weight")
        state = {i: full[n] for i, n in enumerate(names) if full.get(n) is not None}
        it = iter(range(len(names)))
        groups = [
            {**saved, "params": [next(it) for _ in g["params"]]}
            for saved, g in zip(sd["param_groups"], opt.param_groups, strict=True)
        ]
        opt.load_state_dict({"state": state, "param_groups": groups})
