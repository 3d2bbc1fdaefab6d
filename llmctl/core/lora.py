"""Low-rank adapters (LoRA; Hu et al., 2021, arXiv:2106.09685) for `llmctl sft`.

Every parameter of the model is frozen and each targeted linear layer `W` (out x in) gets a
trainable update `B @ A`, with `A` (rank x in) and `B` (out x rank):

    y = x W^T + dropout(x) A^T B^T * (alpha / rank)

Choices, and why:

- **Targets.** By default all four projections in every block: the fused attention input `wqkv`,
  its output `wo`, the fused SwiGLU gate/up `w13` and the down projection `w2`. The paper adapted
  only W_q and W_v, but later work (QLoRA, Dettmers et al., 2023) found that adapting every block
  linear is what closes the gap to full fine-tuning, and the cost stays small: rank 8 on all four
  adds about 6% of the block weights at the `tiny` preset and 1.3% at `124m`. Because q/k/v and
  gate/up are fused here, one adapter covers each whole fused matrix (the paper would give q, k and
  v separate ones), so the rank budget is shared between them. The LM head is opt-in (`lm_head`)
  and is refused when it is tied to the token embedding: an adapter on a shared matrix would change
  the input embeddings too, and merging it could not be stored as a plain tied checkpoint.
  Embeddings and norms are never adapted.
- **Scaling.** The update is multiplied by `alpha / rank`, as in the paper, so that changing the
  rank does not require re-tuning the learning rate; alpha = 2 x rank is the common default.
- **Init.** `A` is Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), the paper's
  reference choice (the same as `nn.Linear`'s default); `B` is zero. So a freshly adapted model
  computes exactly what the base model does (A's gradient is zero until B has moved).
  `A` is drawn on the CPU in fp32 from an optional `torch.Generator` and then moved to the base
  weight's device and dtype, so the same seed gives the same adapters on any device.
- **Dropout** applies to the adapter's input only; the frozen path never sees it.

Adapters live inside the model as `LoraLinear` modules, so `.to(device)`, autocast and optimizers
treat them like any other parameters. Checkpoints stay plain: `merge_lora` folds `W + scale * B A`
back into ordinary `nn.Linear`s (after which `save_checkpoint` works unchanged), and
`merged_state_dict` gives the same plain state dict without touching the model, for checkpoints in
the middle of a run. `lora_state_dict` / `load_lora_state_dict` carry just the adapters, for resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llmctl.core.config import require
from llmctl.core.errors import ConfigError, InputError

#: Linear layers of `llmctl.core.model.Transformer` that can carry an adapter, by attribute name.
KNOWN_TARGETS = ("wqkv", "wo", "w13", "w2", "lm_head")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapter settings (the `--lora-*` flags of `llmctl sft`)."""

    rank: int = 8  # rank r of each update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input during training
    targets: tuple[str, ...] = ("wqkv", "wo", "w13", "w2")  # linear layers to adapt, by name

    def __post_init__(self) -> None:
        # Accept any sequence (a TOML list, a comma-split flag) but store a hashable tuple.
        object.__setattr__(self, "targets", tuple(self.targets))
        require(self.rank >= 1, f"--lora-rank must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"--lora-alpha must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.dropout}")
        require(len(self.targets) > 0, "--lora-targets must name at least one layer")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        require(
            not unknown,
            f"--lora-targets has unknown layer(s) {', '.join(unknown)} "
            f"(choose from {', '.join(KNOWN_TARGETS)})",
        )
        require(
            len(set(self.targets)) == len(self.targets),
            f"--lora-targets names a layer twice: {', '.join(self.targets)}",
        )

    @property
    def scale(self) -> float:
        """Multiplier of the low-rank update, alpha / rank."""
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: `base(x) + s * B(A(dropout(x)))`."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Wrap `base` (which is frozen in place) with a rank-`rank` adapter.

        Args:
            base: The linear layer to adapt.
            rank: Rank of the update.
            alpha: The update is scaled by alpha / rank.
            dropout: Dropout probability on the adapter's input.
            generator: CPU generator for A's init (default: the global RNG).
        """
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        # Drawn on the CPU in fp32, then moved: identical adapters on every device for one seed.
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) in closed form
        a = torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_b = nn.Parameter(
            torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype)
        )  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out, in), for code that reads `.weight.dtype` and the like."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        h = self.dropout(x) @ self.lora_a.T  # (..., r): the rank bottleneck
        return self.base(x) + (h @ self.lora_b.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The update `scale * B @ A` as a dense (out, in) matrix in the base weight's dtype."""
        return self._delta_fp32().to(self.base.weight.dtype)

    def _delta_fp32(self) -> torch.Tensor:
        # In fp32 so that merging into a bf16 weight rounds once, not twice.
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """`W + scale * B @ A`, (out, in), a new tensor in the base weight's dtype."""
        w = self.base.weight
        return (w.float() + self._delta_fp32()).to(w.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing what this module computes in eval mode (base untouched)."""
        w = self.base.weight
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.base.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        out.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        """Shown by `print(model)`."""
        return f"rank={self.rank}, alpha={self.alpha}"


def _lora_modules(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """(qualified name, module) of every adapter, in registration order (deterministic)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _shared_weight(model: nn.Module, name: str, weight: torch.Tensor) -> str | None:
    """Name of another parameter that is the same tensor as `weight` (a tied matrix), if any."""
    for other, p in model.named_parameters(remove_duplicate=False):
        if p is weight and other != f"{name}.weight":
            return other
    return None


def apply_lora(
    model: nn.Module, cfg: LoraConfig, *, generator: torch.Generator | None = None
) -> list[nn.Parameter]:
    """Freeze the model and put an adapter on each target linear layer, in place.

    Works before or after `.to(device)`: adapters are created on each base weight's device and
    dtype.

    Args:
        model: A `Transformer` (or any module whose linears are named like its).
        cfg: Rank, scaling, dropout and target layer names.
        generator: CPU generator for the adapters' init, for reproducible runs.

    Returns:
        The trainable parameters (A then B of each adapter, in module order), for the optimizer.

    Raises:
        ConfigError: A target is tied to another weight (the LM head with tied embeddings), no layer
            matches the targets, or the model already has adapters.
    """
    if _lora_modules(model):
        raise ConfigError(
            "the model already has LoRA adapters", "call merge_lora(model) before applying again"
        )
    found = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rpartition(".")[2] in cfg.targets
    ]
    for name, lin in found:
        tied = _shared_weight(model, name, lin.weight)
        if tied is not None:
            raise ConfigError(
                f"--lora-targets includes {name}, whose weight is tied to {tied}; "
                "a tied matrix cannot take an adapter",
                f"drop {name.rpartition('.')[2]} from --lora-targets "
                "(or fine-tune a model trained with tie_embeddings=false)",
            )
    if not found:
        raise ConfigError(
            f"--lora-targets {','.join(cfg.targets)} matches no linear layer of the model",
            f"choose from {', '.join(KNOWN_TARGETS)}",
        )
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name, lin in found:
        lora = LoraLinear(lin, cfg.rank, cfg.alpha, cfg.dropout, generator=generator)
        lora.train(lin.training)
        _set_submodule(model, name, lora)
        params += [lora.lora_a, lora.lora_b]
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place, and make all parameters trainable again.

    Afterwards the model holds only plain `nn.Linear`s, so its `state_dict()` has exactly the keys
    of a model that never had adapters and `save_checkpoint` / `load_checkpoint` work unchanged.

    Returns:
        `model`, for chaining.
    """
    for name, lora in _lora_modules(model):
        merged = lora.merged()
        merged.train(lora.training)
        _set_submodule(model, name, merged)
    model.requires_grad_(True)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model would have after `merge_lora`, without changing the model.

    Keys and order are those of the plain model; merged weights are new tensors, the rest are the
    model's own (detached) tensors, as `state_dict()` gives them.
    """
    rename: dict[str, tuple[str, LoraLinear | None]] = {}  # LoraLinear key -> plain key
    drop: set[str] = set()
    for name, lora in _lora_modules(model):
        p = f"{name}." if name else ""
        rename[f"{p}base.weight"] = (f"{p}weight", lora)
        rename[f"{p}base.bias"] = (f"{p}bias", None)
        drop |= {f"{p}lora_a", f"{p}lora_b"}
    sd: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in drop:
            continue  # folded into the weight
        if key in rename:
            plain, lora = rename[key]
            sd[plain] = lora.merged_weight() if lora is not None else t
        else:
            sd[key] = t
    return sd


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Just the adapter tensors, e.g. `layers.0.attn.wqkv.lora_a`, detached, for resume."""
    sd: dict[str, torch.Tensor] = {}
    for name, lora in _lora_modules(model):
        sd[f"{name}.lora_a"] = lora.lora_a.detach()
        sd[f"{name}.lora_b"] = lora.lora_b.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a model that `apply_lora` has prepared the same way.

    Raises:
        InputError: The key sets differ (adapters on other layers) or a shape differs (another
            rank); the message names the first offending keys.
    """
    own = lora_state_dict(model)
    hint = "resume with the same --lora-rank and --lora-targets as the run that saved it"
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:4])}")
        raise InputError(
            f"LoRA state does not match the model's adapters: {'; '.join(parts)}", hint
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if sd[k].shape != v.shape
    ]
    if bad:
        raise InputError(
            f"LoRA state shapes do not match the model's adapters (saved vs model): "
            f"{', '.join(bad[:4])}",
            hint,
        )
    for k, v in own.items():
        v.copy_(sd[k])  # copy_ converts device and dtype


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
