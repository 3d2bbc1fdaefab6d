"""Autoregressive decoding with a KV cache: the one generator that generate, chat, eval and ppo use.

Speaks token ids only. Prompts of unequal length are left-padded into one batch: a boolean mask
keeps real tokens from attending to padding and RoPE positions count real tokens only, so each row
decodes exactly as it would alone. (Every query may also attend to itself, so a padding row is never
fully masked; a fully masked row would turn into NaN and leak through 0 * NaN.) Prefill runs the
prompt once; each later step feeds one token per row. Equal-length batches take the mask-free path,
where SDPA can use its flash kernel.

Lockstep decoding (`all_finished`, opt-in): under FSDP every forward is a collective, so processes
that decode their own rows must make the same number of forward calls. Given a function that says
whether every process's rows have stopped (an all-reduce), a process whose rows have all stopped
keeps stepping (yielding only None) until all have. Its own rows' tokens are the same either way.
Lockstep decoding runs under `no_grad` instead of `inference_mode`: FSDP keeps its gathered
parameters and buffers between forwards, and tensors first made in inference mode could not be
written by the training forwards that follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmctl.core.config import require
from llmctl.core.model import Transformer


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 128  # upper bound; also capped by the model's context
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 50  # keep the k most likely tokens (0 = off)
    top_p: float = 0.95  # nucleus: smallest set with this much probability (1.0 = off)

    def __post_init__(self) -> None:
        require(
            self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"
        )
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")


def pick(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from (B, V) logits."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = (
            cum - sorted_logits.softmax(dim=-1) >= cfg.top_p
        )  # mass before this token already >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def ragged_prefill_inputs(
    lens: torch.Tensor, L: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For prompts of `lens` tokens left-padded to L: which slots are real (B, L), the attention
    mask (B, 1, L, L: causal over real keys; a padding query sees itself, so no row is empty)
    and the RoPE positions (B, L: 0 at each prompt's first token)."""
    device = lens.device
    real = torch.arange(L, device=device)[None, :] >= (L - lens)[:, None]
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=device)
    mask = (causal[None] & real[:, None, :]) | eye[None]
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    return real, mask[:, None], positions


def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    all_finished: Callable[[bool], bool] | None = None,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row (None once a row has stopped).

    A row stops after emitting a stop id (which is yielded) or when the context is full.

    Args:
        model: The decoder (eval mode).
        prompts: Token ids per row; each non-empty.
        cfg: Sampling settings.
        stop_ids: Ids that end a row (EOS, end-of-turn).
        generator: Seeded torch.Generator on the model's device, for reproducible sampling.
        pad_id: Id used for left padding (never attended to).
        all_finished: Lockstep with other processes (see the module docstring): called once per
            step with "this process's rows have all stopped", returns whether every process's
            have; decoding ends when it says so. Every process must have the same step budget,
            min(max_new_tokens, context - longest prompt), which the caller ensures.
    """
    args = (model, prompts, cfg, stop_ids, generator, pad_id, all_finished)
    return _decode_no_grad(*args) if all_finished is not None else _decode_inference(*args)


@torch.inference_mode()
def _decode_inference(*args: Any) -> Iterator[list[int | None]]:
    yield from _decode(*args)


@torch.no_grad()
def _decode_no_grad(*args: Any) -> Iterator[list[int | None]]:
    yield from _decode(*args)


def _decode(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    stop_ids: Sequence[int],
    generator: torch.Generator | None,
    pad_id: int,
    all_finished: Callable[[bool], bool] | None,
) -> Iterator[list[int | None]]:
    require(
        len(prompts) > 0 and all(len(p) > 0 for p in prompts),
        "every prompt needs at least one token",
    )
    device = model.embed.weight.device
    B = len(prompts)
    plens = [len(p) for p in prompts]
    L = max(plens)
    ctx = model.cfg.max_seq_len
    require(ctx > L, f"prompt of {L} tokens leaves no room in the {ctx}-token context")
    steps = min(cfg.max_new_tokens, ctx - L)
    rows = [[pad_id] * (L - len(p)) + list(p) for p in prompts]
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    cache = model.new_cache(B, L + steps)
    ragged = min(plens) != L
    if ragged:
        lens = torch.tensor(plens, device=device)
        real, mask, positions = ragged_prefill_inputs(lens, L)
        cache.mask = torch.zeros(B, L + steps, dtype=torch.bool, device=device)
        cache.mask[:, :L] = real
        h = model(ids, cache=cache, positions=positions, attn_mask=mask, hidden=True)
    else:
        h = model(ids, cache=cache, hidden=True)
    # Only the last position's logits are needed: the head runs on B rows, not B * L.
    nxt = pick(model.logits(h[:, -1]), cfg, generator)
    stops = set(stop_ids)
    done = [False] * B
    for step in range(steps):
        toks = nxt.tolist()  # the one host read per step
        yield [None if d else t for t, d in zip(toks, done, strict=True)]
        if stops:
            done = [d or t in stops for t, d in zip(toks, done, strict=True)]
        finished = bool(stops) and all(done)
        if all_finished is not None:  # one collective per step on every process
            finished = all_finished(finished)
        if finished:
            return
        if step == steps - 1:
            return
        if ragged:
            cache.mask[:, L + step] = True
            h = model(
                nxt[:, None],
                cache=cache,
                positions=(lens + step)[:, None],
                attn_mask=cache.mask[:, None, None, : L + step + 1],
                hidden=True,
            )
        else:
            h = model(nxt[:, None], cache=cache, hidden=True)
        nxt = pick(model.logits(h[:, -1]), cfg, generator)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    all_finished: Callable[[bool], bool] | None = None,
) -> list[list[int]]:
    """Batched generation; returns each row's new tokens (the stop token included if hit).
    Arguments as in `stream`."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in stream(
        model,
        prompts,
        cfg,
        stop_ids=stop_ids,
        generator=generator,
        pad_id=pad_id,
        all_finished=all_finished,
    ):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs
