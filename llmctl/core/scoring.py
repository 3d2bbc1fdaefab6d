"""Scoring text with a decoder: summed log-probabilities of chosen tokens, batched, no gradients.

One primitive serves perplexity (`llmctl eval ppl`) and the lm-eval adapter's `loglikelihood` and
`loglikelihood_rolling`, so all three give the same numbers for the same tokens:

    Span(ids, n_scored)   the last `n_scored` tokens of `ids` are scored, each given every token
                          before it in `ids` (ids[0] is context only)

`score_spans` runs spans in batches of similar length (longest first, so an out-of-memory error
shows on the first batch), right-padded: the model is causal, so padding after a row's last real
token changes none of its predictions and needs no mask. Identical spans are computed once. Only
scored positions go through the LM head, in chunks, so a (batch, seq, vocab) logits tensor is never
built. Log-softmax runs in fp32 whatever the autocast dtype.

Texts longer than the context are cut into spans by `rolling_spans`: the sliding-window scheme of
Hugging Face's perplexity guide, where each token is scored exactly once and the window moves by
`stride` tokens; stride = context gives disjoint windows (fastest, least context for the first
tokens of each window), stride 1 gives every token the full context (slowest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmctl.core.model import Transformer

_HEAD_ROWS = 1024  # scored positions per LM-head chunk: 1024 x vocab fp32 logits at a time


@dataclass(frozen=True)
class Span:
    """A token sequence whose last `n_scored` tokens are scored given everything before them."""

    ids: tuple[int, ...]
    n_scored: int


@dataclass(frozen=True)
class SpanScore:
    """The result of one span."""

    logprob: float  # sum of log p(token | prefix) over the scored tokens (natural log)
    greedy: bool  # every scored token is the argmax of its distribution


def rolling_spans(ids: Sequence[int], context: int, stride: int | None = None) -> list[Span]:
    """Cut `ids` into spans that score ids[1:] once each, with at most `context` input tokens.

    The span scoring ids[a:b] (b - a <= stride) takes ids[max(0, b - 1 - context) : b] as input,
    so its first scored token sees max(a, context - stride + 1) tokens of context and its last up
    to `context` tokens.

    Args:
        ids: Tokens, the first being the prefix (BOS) that is never scored.
        context: The model's longest input (max_seq_len).
        stride: Tokens scored per span, 1..context (default: context, disjoint windows).

    Returns:
        Spans in order; empty when there is nothing to score.
    """
    stride = stride or context
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, {context}], got {stride}")
    spans, start, n = [], 1, len(ids)
    while start < n:
        end = min(start + stride, n)
        lo = max(0, end - 1 - context)
        spans.append(Span(tuple(ids[lo:end]), end - start))
        start = end
    return spans


def continuation_span(context: Sequence[int], continuation: Sequence[int], max_len: int) -> Span:
    """The span scoring `continuation` after `context`, cut on the left to `max_len` input tokens
    (as lm-eval's Hugging Face model does); a continuation longer than that is scored in part."""
    ids = (list(context) + list(continuation))[-(max_len + 1) :]
    return Span(tuple(ids), min(len(continuation), len(ids) - 1))


@torch.no_grad()
def score_spans(
    model: Transformer, spans: Sequence[Span], *, batch_size: int = 8, pad_id: int = 0
) -> list[SpanScore]:
    """Summed log-probability and greediness of each span's scored tokens.

    Args:
        model: The decoder, in eval mode (the caller may wrap this in autocast).
        spans: What to score; each input (ids[:-1]) fits the model's context.
        batch_size: Spans per forward pass.
        pad_id: Filler after short rows (never scored, never attended to by real tokens).

    Returns:
        One SpanScore per span, in input order.
    """
    unique = list(dict.fromkeys(spans))  # identical requests share one computation
    unique.sort(key=lambda s: -len(s.ids))
    found: dict[Span, SpanScore] = {}
    for i in range(0, len(unique), batch_size):
        batch = unique[i : i + batch_size]
        found.update(zip(batch, _score_batch(model, batch, pad_id), strict=True))
    return [found[s] for s in spans]


def _score_batch(model: Transformer, batch: list[Span], pad_id: int) -> list[SpanScore]:
    device = model.embed.weight.device
    T = max(max(len(s.ids) for s in batch) - 1, 1)
    inp = torch.full((len(batch), T), pad_id, dtype=torch.long, device=device)
    tgt = torch.full((len(batch), T), -1, dtype=torch.long, device=device)
    for r, s in enumerate(batch):
        L = len(s.ids) - 1
        if L < 1:
            continue
        ids = torch.tensor(s.ids, dtype=torch.long, device=device)
        inp[r, :L] = ids[:-1]
        if s.n_scored:
            tgt[r, L - s.n_scored : L] = ids[-s.n_scored :]
    hidden = model(inp, hidden=True)  # (B, T, d_model)
    rows, cols = (tgt >= 0).nonzero(as_tuple=True)
    h = hidden[rows, cols]  # (N, d_model): scored positions only
    t = tgt[rows, cols]
    lp = torch.empty(t.numel(), dtype=torch.float64, device=device)
    hit = torch.empty(t.numel(), dtype=torch.bool, device=device)
    for a in range(0, t.numel(), _HEAD_ROWS):
        logits = model.lm_head(h[a : a + _HEAD_ROWS]).float()  # (n, vocab)
        logp = logits.log_softmax(-1)
        tt = t[a : a + _HEAD_ROWS]
        lp[a : a + _HEAD_ROWS] = logp.gather(-1, tt[:, None]).squeeze(-1).double()
        hit[a : a + _HEAD_ROWS] = logits.argmax(-1) == tt
    sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, lp)
    misses = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(
        0, rows, (~hit).long()
    )
    return [
        SpanScore(float(s), bool(m == 0))
        for s, m in zip(sums.tolist(), misses.tolist(), strict=True)
    ]


@dataclass
class NllTotals:
    """Running sums for perplexity and bits per byte."""

    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0  # scored tokens
    bytes: int = 0  # UTF-8 bytes of the scored text
    documents: int = 0

    def add(self, nll: float, tokens: int, n_bytes: int) -> None:
        """Count one document."""
        self.nll += nll
        self.tokens += tokens
        self.bytes += n_bytes
        self.documents += 1

    def metrics(self) -> dict[str, float]:
        """mean NLL per token, perplexity = exp(mean NLL), bits per byte = NLL / ln 2 / bytes
        (tokenizer-independent, so models with different vocabularies compare), and bytes per
        token."""
        mean = self.nll / max(self.tokens, 1)
        return {
            "nll_per_token": mean,
            "perplexity": math.exp(min(mean, 700.0)),
            "bits_per_byte": self.nll / math.log(2) / max(self.bytes, 1),
            "bytes_per_token": self.bytes / max(self.tokens, 1),
        }
