"""Sizing a training run before paying for it: FLOPs, memory per device for each parallel strategy,
and time at a stated MFU. Pure arithmetic on a `ModelConfig`; no device is touched.

FLOPs per token are `model.flops_per_token`: 6 x (non-embedding parameters + the LM head) for the
forward and backward matmuls (Kaplan et al., 2020) plus 12 x n_layers x d_model x seq_len for
attention scores and values (PaLM, Chowdhery et al., 2022, appendix B). Time = FLOPs / (GPUs x peak
bf16 FLOP/s x MFU).

Memory per device, by what is kept (bytes per parameter P, as llmctl trains: fp32 master weights
under bf16 autocast, AdamW with two fp32 moments):

    weights 4P, gradients 4P, optimizer 8P                      (16 bytes per parameter)
    ddp       everything replicated:          4P + 4P + 8P
    zero1     optimizer state sharded:        4P + 4P + 8P/N
    zero2     + gradients sharded:            4P + 4P/N + 8P/N
    fsdp      + weights sharded (ZeRO-3):     16P/N
    fsdp+tp   TP over `tp` GPUs, FSDP over the N/tp data-parallel groups: 16P/N, activations / tp

(Rajbhandari et al., 2020, ZeRO; FSDP's fully_shard is ZeRO-3.) FSDP also holds one layer's full
weights (and their gradients) while it computes: 8 x (params of the largest block) extra.

Activations kept for the backward pass, per micro-batch, with flash attention (no T x T scores
stored) and `act_bytes` per element (2 under bf16 autocast):

    B x T x n_layers x act_bytes x (7 d_model + 4 kv_dim + 4 d_ff)

per layer: norm inputs and outputs (4 d), q/k/v before and after RoPE (2 (d + 2 kv_dim)), the
attention output (d), the SwiGLU gate/up outputs, activation and product (4 d_ff). This follows
Korthikanti et al. (2022), whose GPT count is 34 d x act_bytes/2 per token per layer, adapted to the
Llama block. With activation checkpointing only each layer's input (d_model) is kept, plus one layer's
full activations during its recomputation. The fused LM head + loss never builds the (B x T x vocab)
logits. Under TP (as `pretrain --tp` runs it: no sequence parallelism) q/k/v, the attention output
and the SwiGLU tensors are split over `tp`, the norms' inputs and outputs (4 d) and the checkpointed
layer inputs are whole on every rank. Not counted: the CUDA context and allocator fragmentation (budget ~10%), DDP's gradient
buckets, communication buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmctl.core.errors import ConfigError
from llmctl.core.model import ModelConfig, flops_per_token, param_count

Strategy = Literal["ddp", "zero1", "zero2", "fsdp", "fsdp+tp"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "zero1", "zero2", "fsdp", "fsdp+tp")

# Dense bf16 peak FLOP/s (no sparsity) and memory per GPU, by the names `--gpu` takes.
GPUS: dict[str, tuple[float, float]] = {
    "h100": (989e12, 80e9),
    "h200": (989e12, 141e9),
    "a100": (312e12, 80e9),
    "a100-40gb": (312e12, 40e9),
    "l40s": (362e12, 48e9),
    "a10g": (125e12, 24e9),
}
BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIM = 4, 4, 8  # fp32 master weights, fp32 grads, AdamW m and v
GIB = 1024**3


@dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """Sum of the four."""
        return self.weights + self.gradients + self.optimizer + self.activations


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    return attn + 3 * d * cfg.d_ff + 2 * d


def activation_bytes(
    cfg: ModelConfig,
    *,
    micro_batch: int,
    seq_len: int,
    act_bytes: int = 2,
    checkpointing: bool = False,
    tp: int = 1,
) -> float:
    """Activations kept for the backward pass of one micro-batch (see the module docstring)."""
    kv_dim = cfg.n_kv_heads * cfg.head_dim
    split = 3 * cfg.d_model + 4 * kv_dim + 4 * cfg.d_ff  # divided among TP ranks
    per_layer = micro_batch * seq_len * act_bytes * (4 * cfg.d_model + split / tp)
    if checkpointing:
        inputs = micro_batch * seq_len * act_bytes * cfg.d_model * cfg.n_layers
        return inputs + per_layer
    return per_layer * cfg.n_layers


def memory(
    cfg: ModelConfig,
    strategy: Strategy,
    *,
    gpus: int,
    tp: int = 1,
    micro_batch: int,
    seq_len: int,
    act_bytes: int = 2,
    checkpointing: bool = False,
) -> Memory:
    """Memory per device of one strategy on `gpus` devices (TP degree `tp` for "fsdp+tp")."""
    p = param_count(cfg)
    n = gpus
    tp = tp if strategy == "fsdp+tp" else 1
    act = activation_bytes(
        cfg,
        micro_batch=micro_batch,
        seq_len=seq_len,
        act_bytes=act_bytes,
        checkpointing=checkpointing,
        tp=tp,
    )
    w, g, o = BYTES_WEIGHT * p, BYTES_GRAD * p, BYTES_OPTIM * p
    if strategy == "ddp":
        return Memory(w, g, o, act)
    if strategy == "zero1":
        return Memory(w, g, o / n, act)
    if strategy == "zero2":
        return Memory(w, g / n, o / n, act)
    # fsdp / fsdp+tp: everything sharded, plus one block gathered (weights and its gradients)
    # while it computes; under TP the gathered block is the rank's 1/tp slice.
    gathered = (BYTES_WEIGHT + BYTES_GRAD) * block_params(cfg) / tp
    return Memory(w / n + gathered / 2, g / n + gathered / 2, o / n, act)


@dataclass(frozen=True)
class Estimate:
    """The plan of a training run."""

    params: int
    params_non_embedding: int
    tokens: int
    flops_per_token: float
    flops: float
    gpus: int
    gpu: str
    mfu: float
    seconds: float
    gpu_hours: float
    memory: dict[str, Memory]
    gpu_memory: float

    def fits(self, strategy: str) -> bool:
        """Whether a strategy's estimate fits in one GPU's memory (with 10% headroom)."""
        return self.memory[strategy].total <= 0.9 * self.gpu_memory


def estimate(
    cfg: ModelConfig,
    *,
    tokens: int,
    seq_len: int,
    micro_batch: int,
    gpus: int = 1,
    tp: int = 1,
    gpu: str = "h100",
    mfu: float = 0.4,
    act_bytes: int = 2,
    checkpointing: bool = False,
) -> Estimate:
    """FLOPs, time and memory per device for each strategy.

    Raises:
        ConfigError: Unknown GPU, MFU outside (0, 1], or a TP degree that does not divide the GPUs.
    """
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r} (choose from {', '.join(GPUS)})")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if gpus < 1 or tp < 1 or gpus % tp:
        raise ConfigError(
            f"--tp {tp} must divide --gpus {gpus}",
            "use a TP degree that divides the GPU count, e.g. 8 per node",
        )
    peak, mem = GPUS[gpu]
    fpt = flops_per_token(cfg, seq_len)
    flops = fpt * tokens
    seconds = flops / (gpus * peak * mfu)
    strategies = [s for s in STRATEGIES if s != "fsdp+tp" or tp > 1]
    return Estimate(
        params=param_count(cfg),
        params_non_embedding=param_count(cfg, embeddings=False),
        tokens=tokens,
        flops_per_token=fpt,
        flops=flops,
        gpus=gpus,
        gpu=gpu,
        mfu=mfu,
        seconds=seconds,
        gpu_hours=seconds * gpus / 3600,
        memory={
            s: memory(
                cfg,
                s,
                gpus=gpus,
                tp=tp,
                micro_batch=micro_batch,
                seq_len=seq_len,
                act_bytes=act_bytes,
                checkpointing=checkpointing,
            )
            for s in strategies
        },
        gpu_memory=mem,
    )


def strategy_of(parallel: str, tp: int) -> Strategy:
    """The memory row of a run's `--parallel` and `--tp` (pure TP: "fsdp+tp" with one group)."""
    if tp > 1:
        return "fsdp+tp"
    return "fsdp" if parallel == "fsdp" else "ddp"


def auto_micro_batch(
    cfg: ModelConfig,
    *,
    rows_per_rank: int,
    seq_len: int,
    budget: float,
    strategy: Strategy,
    gpus: int,
    tp: int = 1,
    act_bytes: int = 2,
    checkpointing: bool = False,
) -> tuple[int, Memory]:
    """`--micro-batch auto`: the largest micro-batch that divides a rank's rows per step and whose
    estimated memory (`memory`, plus 10% headroom) fits `budget` bytes; the rest of the step is
    gradient accumulation, so the global batch is unchanged.

    Raises:
        ConfigError: Even one row per micro-step does not fit.
    """
    for mb in sorted(
        (d for d in range(1, rows_per_rank + 1) if rows_per_rank % d == 0), reverse=True
    ):
        m = memory(
            cfg,
            strategy,
            gpus=gpus,
            tp=tp,
            micro_batch=mb,
            seq_len=seq_len,
            act_bytes=act_bytes,
            checkpointing=checkpointing,
        )
        if m.total <= 0.9 * budget:
            return mb, m
    raise ConfigError(
        f"--micro-batch auto: even 1 row of {seq_len} tokens needs ~{m.total / GIB:.1f} GiB per "
        f"device ({strategy}), more than 90% of the {budget / GIB:.1f} GiB there",
        "shard more (--parallel fsdp, more processes, --tp), add --activation-checkpointing, "
        "or lower --seq-len",
    )
