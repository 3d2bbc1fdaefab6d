"""Llama-style decoder-only transformer.

token embedding -> n_layers x [RMSNorm -> grouped-query attention with RoPE -> residual;
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head (tied or untied). No biases.

Conventions follow Hugging Face's `LlamaForCausalLM` exactly (RoPE rotates the two halves of each
head, not interleaved pairs; RMSNorm normalises in fp32), so weights map one-to-one
(`llmctl.core.hf_compat`). Two departures from the textbook layout, both for speed: q/k/v are one
fused projection (`wqkv`) and the SwiGLU gate/up are one (`w13`); tensor parallelism
(`core/parallel.py`) splits them back into `wq`/`wk`/`wv` and `w1`/`w3`, each rank holding its own
heads and columns, and the forward reads either form. Attention is
`F.scaled_dot_product_attention` with `enable_gqa`, so K/V heads are never materialised n_heads times
and the fused flash kernel runs (on CUDA and on CPU). RoPE rotates q and k in one call, writing each
half straight into its output, with the inverse rotation as its hand-written backward. For training,
`forward(ids, targets=...)` returns the loss through `llmctl.core.losses.linear_cross_entropy`,
which fuses the LM head with the cross entropy so the (tokens, vocab) logits are never built.

The model knows nothing of devices, ranks or files. `ModelConfig` is the one source of truth for the
architecture; it is stored as `config.json` in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.config import require
from llmctl.core.losses import linear_cross_entropy


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of the decoder. Names are used alike in code, JSON, flags and docs."""

    vocab_size: int = 32000  # set from the tokenizer by pretrain
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads: = n_heads is MHA, 1 is MQA, between is GQA
    d_ff: int = 688  # SwiGLU hidden width
    max_seq_len: int = 1024  # longest context (RoPE tables, KV cache)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    init_std: float = 0.02  # std of the normal init; residual projections get /sqrt(2*n_layers)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
        )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})",
        )
        require(self.head_dim % 2 == 0, f"head_dim ({self.head_dim}) must be even for RoPE")
        require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        require(self.max_seq_len >= 2, f"max_seq_len must be >= 2, got {self.max_seq_len}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """JSON-ready dict (what `config.json` holds under "model")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so a foreign config.json is caught."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        require(not unknown, f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Named shapes. vocab_size is left to the tokenizer. Parameter counts are at vocab 32000, tied.
PRESETS: dict[str, dict] = {
    # ~1.4M non-embedding params: trains on 2 CPU cores in minutes.
    "tiny": {
        "d_model": 192,
        "n_layers": 4,
        "n_heads": 6,
        "n_kv_heads": 2,
        "d_ff": 512,
        "max_seq_len": 256,
    },
    # GPT-2-small scale: ~124M with a 32k vocabulary.
    "124m": {
        "d_model": 768,
        "n_layers": 12,
        "n_heads": 12,
        "n_kv_heads": 12,
        "d_ff": 2560,
        "max_seq_len": 1024,
    },
    # GPT-2-medium scale, GQA: ~350M.
    "350m": {
        "d_model": 1024,
        "n_layers": 24,
        "n_heads": 16,
        "n_kv_heads": 8,
        "d_ff": 3072,
        "max_seq_len": 2048,
    },
    # Llama-3.2-1B shape: ~1.0B.
    "1b": {
        "d_model": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "d_ff": 8192,
        "max_seq_len": 2048,
        "rope_theta": 500000.0,
    },
    # Llama-2-7B shape: ~6.7B (untied head).
    "7b": {
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "d_ff": 11008,
        "max_seq_len": 4096,
        "tie_embeddings": False,
    },
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named shape with overrides (e.g. vocab_size from the tokenizer)."""
    require(name in PRESETS, f"unknown model preset '{name}' (choose from {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


def param_count(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Number of parameters, computed from the shape alone (matches `sum(p.numel())`)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    mlp = 3 * d * cfg.d_ff
    block = attn + mlp + 2 * d
    n = cfg.n_layers * block + d  # + final norm
    if embeddings:
        n += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    else:
        n += 0 if cfg.tie_embeddings else cfg.vocab_size * d  # the head does matmul work
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM-style:
    6 * (non-embedding params incl. the LM head) + 12 * n_layers * d_model * seq_len (attention)."""
    n = param_count(cfg, embeddings=False) + (
        cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    )
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len


def chinchilla_tokens(cfg: ModelConfig) -> int:
    """Compute-optimal training tokens, about 20 per parameter (Hoffmann et al., 2022)."""
    return 20 * param_count(cfg)


def init_parameter(
    cfg: ModelConfig, name: str, p: torch.Tensor, generator: torch.Generator | None = None
) -> None:
    """Initialise one parameter in place, as `Transformer.init_weights` does for `name`: gains at
    1, residual output projections N(0, init_std / sqrt(2L)), other matrices N(0, init_std).
    Called in `named_parameters` order with one generator, it gives `init_weights`' values (also
    for a model materialised from the meta device one parameter at a time, `parallel.materialize`)."""
    if p.ndim == 1:
        p.fill_(1.0)
    elif name.endswith(("wo.weight", "w2.weight")):
        p.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers), generator=generator)
    else:
        p.normal_(0.0, cfg.init_std, generator=generator)


# ------------------------------------------------------------------------------------------------


def rope_tables(
    cfg: ModelConfig, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, (max_seq_len, head_dim), with each frequency repeated over both halves."""
    inv_freq = 1.0 / (
        cfg.rope_theta
        ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim)
    )
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hd) by position: out = x * cos + rotate_half(x) * sin, as HF computes it.

    cos/sin (from `rope_tables`) broadcast against x: (T, hd) for (B, H, T, hd), (T, 1, hd) for
    (B, T, H, hd). Fused: each half is written straight into the output (two ops a half, no
    rotated copy), and the backward is the inverse rotation, so autograd saves only cos/sin.
    Computed in fp32 and cast back for lower-precision x.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin, 1.0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + sign * rotate_half(x) * sin; the two halves of cos/sin are equal."""
    if x.dtype != cos.dtype:
        return _rotate(x.to(cos.dtype), cos, sin, sign).to(x.dtype)
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    if cos.ndim <= x.ndim and all(
        c in (1, n) for c, n in zip(cos.shape[::-1], x.shape[::-1], strict=False)
    ):
        out = torch.empty_like(x)  # (torch.broadcast_shapes costs more than the rotation here)
    else:
        out = x.new_empty(torch.broadcast_shapes(x.shape, cos.shape))
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


class _Rope(torch.autograd.Function):
    """RoPE is a rotation: its gradient is the inverse rotation of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):  # noqa: ANN001, ANN205
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0).to(ctx.dtype), None, None


class KVCache:
    """Preallocated keys/values for incremental decoding, one (B, n_kv, max_len, hd) pair per layer.

    `pos` is how many positions are filled. `mask` is an optional (B, max_len) bool of which filled
    slots are real tokens (False for left padding in a batch of unequal prompts).
    """

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0
        self.max_len = max_len
        self.mask: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/duplicate batch rows (e.g. to drop finished sequences)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)


def _decode_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, w)` for the 2-16 rows of a batched decode step on CPU, as `(w @ x.T).T` when
    w has the usual (out, in) layout: MKL's `x @ w.T` packs w on every call, which costs most
    when the weights outgrow the cache (a 124M model decoding 4-8 rows here: 1.3-1.7x faster
    per token this way). One row, or w in `Transformer.inference_layout`, stays `F.linear`."""
    rows = x.numel() // x.shape[-1]
    if 1 < rows <= 16 and x.device.type == "cpu" and w.is_contiguous():
        return torch.mm(w, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward, for training on CPU: 5-6% less time per training
    step here than autograd through `F.rms_norm` (whose CPU backward is a chain of generic ops).
    Saves the normalised x and 1/rms; with g the incoming gradient and xhat = x / rms:
    grad_w = sum(g * xhat), grad_x = (g*w - xhat * mean(g*w * xhat)) / rms."""

    @staticmethod
    def forward(ctx, x, w, eps):  # noqa: ANN001, ANN205
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, w)
        return xhat * w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        xhat, rstd, w = ctx.saved_tensors
        grad_w = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        gw = g * w
        m = (gw * xhat).mean(-1, keepdim=True)
        grad_x = gw.sub_(xhat * m).mul_(rstd) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            w = self.weight
            if (
                x.device.type == "cpu"
                and torch.is_grad_enabled()
                and (x.requires_grad or w.requires_grad)
            ):
                return _RMSNormFn.apply(x, w, self.eps)
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # one call (decoding counts calls)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE through fused SDPA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(
            cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if "wqkv" in self._modules:
            n_q, n_kv = self.n_heads, self.n_kv
            qkv = self.wqkv(x).view(B, T, n_q + 2 * n_kv, self.hd)
            qk, v = qkv.split([n_q + n_kv, n_kv], dim=2)
        else:  # unfused q/k/v (tensor parallel): this rank's heads only, counted from the output
            q, k = self.wq(x).view(B, T, -1, self.hd), self.wk(x).view(B, T, -1, self.hd)
            v = self.wv(x).view(B, T, -1, self.hd)
            n_q, n_kv, qk = q.shape[2], k.shape[2], torch.cat([q, k], dim=2)
        # cos/sin come as (T, hd) or (B, 1, T, hd); over (B, T, heads, hd) they broadcast as
        # (T, 1, hd) or (B, T, 1, hd). One rope call rotates q and k together.
        cos, sin = (
            (cos[:, None], sin[:, None])
            if cos.ndim == 2
            else (cos.transpose(1, 2), sin.transpose(1, 2))
        )
        q, k = apply_rope(qk, cos, sin).split([n_q, n_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        is_causal = attn_mask is None
        if cache is not None:
            start = cache.pos
            kc, vc = cache.k[layer], cache.v[layer]
            kc.narrow(2, start, T).copy_(k)
            vc.narrow(2, start, T).copy_(v)
            k, v = kc.narrow(2, 0, start + T), vc.narrow(2, 0, start + T)
            # is_causal aligns the mask top-left, which is right only when nothing precedes the
            # queries; a single new query may see everything; otherwise the caller passes a mask.
            is_causal = attn_mask is None and start == 0 and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=n_kv != n_q
        )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, n_q * self.hd))


class MLP(nn.Module):
    """SwiGLU: w2(silu(x W1) * x W3), with W1 and W3 fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_ff = cfg.d_ff
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "w13" in self._modules:
            gate, up = self.w13(x).split(self.d_ff, dim=-1)
        else:  # unfused (tensor parallel: each rank holds its own columns of both)
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, attn_mask):  # noqa: ANN001, D102
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """The decoder. `forward(ids) -> logits`; see `forward` for incremental decoding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg)
        # Non-persistent: derived from the config, so never stored in a checkpoint.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # (weight, its _version, the (d, vocab) copy) from `inference_layout`; not in state_dict
        self._head_t: tuple[torch.Tensor, int, int, torch.Tensor] | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) for matrices, residual output projections scaled by 1/sqrt(2L)
        (GPT-2 / nanoGPT), norms at 1. Separate from __init__ so a model built on the meta device
        can be sharded first and initialised after."""
        for name, p in self.named_parameters():
            init_parameter(self.cfg, name, p, generator)
        cos, sin = rope_tables(self.cfg, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        hidden: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position, or the mean next-token loss when `targets` is given.

        Args:
            ids: (B, T) token ids.
            cache: KV cache to read and extend (its `pos` advances by T).
            positions: (B, T) RoPE positions; default `cache.pos + arange(T)`.
            attn_mask: (B, 1, T, T_total) bool, True = may attend; default causal.
            hidden: Return the final normed hidden states (B, T, d_model) instead of logits
                (reward and value heads read these).
            targets: (B, T) next-token ids (-100 = no loss): return the mean cross entropy over
                the other positions, a scalar fp32 tensor, through `losses.linear_cross_entropy`,
                which never builds the (B*T, vocab) logits.

        Returns:
            (B, T, vocab_size) logits in the compute dtype, hidden states, or the scalar loss.
        """
        B, T = ids.shape
        start = cache.pos if cache is not None else 0
        # With explicit positions the cache is a timeline of slots that may outgrow the context
        # (core/slots.py); the positions themselves index the RoPE tables, which end there.
        timeline = positions is not None and cache is not None
        limit = cache.k[0].shape[2] if timeline else self.cfg.max_seq_len  # type: ignore[union-attr]
        if start + T > limit:
            what = "the cache's slots" if timeline else "max_seq_len"
            raise ValueError(f"sequence of {start + T} tokens exceeds {what} {limit}")
        if (
            T == 1
            and cache is not None
            and positions is None
            and attn_mask is None
            and targets is None
            and not torch.is_grad_enabled()
            and self._plain()
        ):
            x = self._decode_one(ids, cache)
            return x if hidden else self.lm_head(x)
        if positions is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        if attn_mask is None and start > 0 and T > 1:
            # SDPA's is_causal aligns its mask top-left, which is wrong once cached positions precede
            # the queries; query i sits at position start + i and may see keys 0 .. start + i.
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(start)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, attn_mask)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if targets is not None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return x if hidden else self.lm_head(x)

    def _plain(self) -> bool:
        """Every block as built: fused projections and plain nn.Linear (no adapter, no TP split),
        and the Block class itself (FSDP swaps it for a subclass whose hooks gather the weights,
        which `_decode_one`, reading them directly, would bypass)."""
        return all(
            type(layer.attn._modules.get("wqkv")) is nn.Linear
            and type(layer.attn.wo) is nn.Linear
            and type(layer.mlp._modules.get("w13")) is nn.Linear
            and type(layer.mlp.w2) is nn.Linear
            and type(layer) is Block
            for layer in self.layers
        )

    def _decode_one(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row against the cache: the blocks' own arithmetic, op for op (the
        same results), without the module calls and reshapes a general forward needs. Decoding
        at batch 1 is a few dozen small ops per block, so their count is the cost; see
        `forward`, which sends (B, 1) ids with a cache and no mask or positions here."""
        cfg, pos = self.cfg, cache.pos
        B, H, KV, hd = ids.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # cos/sin (1, 1, hd) broadcast over (B, 1, heads, hd), as in Attention.forward
        c, s = self.rope_cos[pos : pos + 1, None], self.rope_sin[pos : pos + 1, None]
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.attn, layer.mlp
            h = layer.attn_norm(x)
            qkv = _decode_linear(h, attn.wqkv.weight).view(B, 1, H + 2 * KV, hd)
            qk = apply_rope(qkv[:, :, : H + KV], c, s)
            kc, vc = cache.k[i], cache.v[i]
            kc[:, :, pos] = qk[:, 0, H:]
            vc[:, :, pos] = qkv[:, 0, H + KV :]
            y = F.scaled_dot_product_attention(
                qk[:, :, :H].transpose(1, 2),
                kc[:, :, : pos + 1],
                vc[:, :, : pos + 1],
                enable_gqa=KV != H,
            )  # one query may see every cached position: no mask
            x = x + _decode_linear(y.transpose(1, 2).reshape(B, 1, H * hd), attn.wo.weight)
            gate, up = _decode_linear(layer.mlp_norm(x), mlp.w13.weight).split(cfg.d_ff, dim=-1)
            x = x + _decode_linear(F.silu(gate) * up, mlp.w2.weight)
        cache.pos += 1
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states (..., d_model) -> (..., vocab_size), for decoding
        (a few rows at a time; `forward` applies the head to whole sequences).

        With a handful of rows on CPU, MKL's `h @ W.T` is slow for a tall (vocab x d) W; the same
        product as `(W @ h.T).T` runs 1.3-1.7x faster there (the result is a transposed view).
        One row after `inference_layout` multiplies by the head's (d, vocab) copy instead.
        """
        rows = h.numel() // h.shape[-1]
        w = self.lm_head.weight
        plain = type(self.lm_head) is nn.Linear  # not wrapped (an adapter would be bypassed)
        if not plain or h.device.type != "cpu" or rows > 16 or torch.is_autocast_enabled("cpu"):
            return self.lm_head(h)
        h2 = h.reshape(rows, -1).to(w.dtype)
        if rows == 1 and (wt := self._head_copy(w)) is not None:
            return torch.mm(h2, wt).view(*h.shape[:-1], -1)
        return torch.mm(w, h2.t()).t().view(*h.shape[:-1], -1)

    def _head_copy(self, w: torch.Tensor) -> torch.Tensor | None:
        """The (d, vocab) copy of the head if it still holds `w`'s current values. Updates through
        torch ops (`load_state_dict`, AdamW's default implementations) bump the weight's version;
        a new storage (`.data = ...`) changes its address; `train()`, `.to()` and dtype changes
        drop the copy (see `train`, `_apply`). Writes that bypass all of these (fused optimizers,
        in-place writes to `.data`) are for training, which `train()` has already cut off."""
        held = self._head_t
        if held is None:
            return None
        ref, version, ptr, wt = held
        if ref is not w or w._version != version or w.data_ptr() != ptr or wt.dtype != w.dtype:
            return None
        return wt

    def train(self, mode: bool = True) -> Transformer:
        """As `nn.Module.train`; training mode also drops `inference_layout`'s head copy."""
        if mode:
            self._head_t = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202, D102 - .to(), .float(), .cuda(), ...
        self._head_t = None
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def inference_layout(self) -> Transformer:
        """Lay the weights out for decoding on CPU; every value stays the same. Returns self.

        Each block's projection matrices are stored transposed (the (out, in) parameter becomes a
        view of a contiguous (in, out) tensor: no extra memory). For a product with one or a few
        rows, MKL reads such a matrix straight through, where the usual (out, in) layout makes it
        pack a copy of the weights on every call; when the weights outgrow the cache (as every
        decode step streams all of them) the packed copy doubles the memory traffic. The LM head
        keeps its layout (the embedding lookup and products of 4 rows or more want it) and gets a
        (d, vocab) copy for one-row decoding: d x vocab more floats.

        Measured here (2-core EPYC, fp32, greedy): one stream decodes 1.24-1.26x faster for the
        tiny preset, the d 256 benchmark shape and a 124M model; with 4-8 rows this layout is
        0.9-1.05x of the usual one for small models and about 0.8x for the 124M (whose usual
        layout takes `_decode_linear`'s faster route). So it is for single-stream decoding:
        `chat`, `serve`, and `generate` with one sample call it after loading (through
        `load_checkpoint(..., inference=True)`); batched eval keeps the usual layout. Training
        is unaffected by either. A no-op off CPU (cuBLAS takes either layout).
        """
        w = self.lm_head.weight
        if w.device.type != "cpu":
            return self
        for block in self.layers:
            for mod in block.modules():
                if type(mod) is nn.Linear and mod.weight.is_contiguous():
                    mod.weight.data = mod.weight.data.t().contiguous().t()
        if type(self.lm_head) is nn.Linear and not w.is_inference():  # (no version counter)
            self._head_t = (w, w._version, w.data_ptr(), w.detach().t().contiguous())
        return self

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype."""
        w = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, w.device, w.dtype)
