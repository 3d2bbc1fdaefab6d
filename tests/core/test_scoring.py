"""core/scoring.py: rolling windows score each token once, batched scores equal a direct forward."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.scoring import NllTotals, Span, continuation_span, rolling_spans, score_spans


def _direct(model: Transformer, ids: list[int], first: int) -> tuple[float, bool]:
    """Sum of log p(ids[i] | ids[:i]) for i >= first, from one full forward."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    idx = torch.arange(first - 1, len(ids) - 1)
    tgt = torch.tensor(ids[first:])
    greedy = bool((logp[idx].argmax(-1) == tgt).all())
    return float(logp[idx, tgt].double().sum()), greedy


@pytest.mark.parametrize(("n", "ctx", "stride"), [(10, 4, 4), (10, 4, 1), (5, 8, 8), (9, 4, 3)])
def test_rolling_spans_score_every_token_once_within_the_context(
    n: int, ctx: int, stride: int
) -> None:
    ids = list(range(100, 100 + n))
    spans = rolling_spans(ids, ctx, stride)
    scored = [t for s in spans for t in s.ids[len(s.ids) - s.n_scored :]]
    assert scored == ids[1:]
    assert all(len(s.ids) - 1 <= ctx and s.n_scored <= stride for s in spans)
    assert all(list(s.ids) == ids[ids.index(s.ids[0]) :][: len(s.ids)] for s in spans)


def test_rolling_spans_rejects_a_stride_beyond_the_context() -> None:
    with pytest.raises(ValueError, match="stride"):
        rolling_spans([1, 2, 3], 4, 5)


def test_score_spans_equals_a_direct_forward_whatever_the_batching(
    tiny_cfg: ModelConfig, make_model: Callable[..., Transformer]
) -> None:
    model = make_model(tiny_cfg)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(4, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 17, 2)]
    spans = [Span(tuple(s), k) for s, k in zip(seqs, (3, 16, 1, 16, 1), strict=True)]
    want = [_direct(model, list(s.ids), len(s.ids) - s.n_scored) for s in spans]
    for bs in (1, 2, 8):
        got = score_spans(model, spans, batch_size=bs)
        for g_, (lp, greedy) in zip(got, want, strict=True):
            assert g_.logprob == pytest.approx(lp, abs=1e-4)
            assert g_.greedy == greedy


def test_stride_one_gives_each_token_the_full_context(
    tiny_cfg: ModelConfig, make_model: Callable[..., Transformer]
) -> None:
    model = make_model(tiny_cfg)  # context 64
    ids = torch.randint(4, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    ctx = tiny_cfg.max_seq_len
    brute = sum(_direct(model, ids[max(0, i - ctx) : i + 1], min(i, ctx))[0] for i in range(1, 150))
    got = sum(s.logprob for s in score_spans(model, rolling_spans(ids, ctx, 1), batch_size=32))
    assert got == pytest.approx(brute, rel=1e-5)


def test_continuation_span_keeps_the_continuation_and_cuts_the_context_on_the_left() -> None:
    s = continuation_span(list(range(10)), [50, 51], max_len=5)
    assert s.ids == (6, 7, 8, 9, 50, 51)
    assert s.n_scored == 2


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(
    tiny_cfg: ModelConfig, make_model: Callable[..., Transformer]
) -> None:
    model = make_model(tiny_cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # constant logits: p = 1/V for every token
    ids = list(range(1, 101))
    totals = NllTotals()
    nll = -sum(s.logprob for s in score_spans(model, rolling_spans(ids, 64, 32)))
    totals.add(nll, len(ids) - 1, 200)
    m = totals.metrics()
    assert m["perplexity"] == pytest.approx(tiny_cfg.vocab_size, rel=1e-6)
    assert m["nll_per_token"] == pytest.approx(math.log(256))
    # 99 tokens x 8 bits each (log2 256) over 200 bytes
    assert m["bits_per_byte"] == pytest.approx(99 * 8 / 200)


def test_bits_per_byte_by_hand() -> None:
    t = NllTotals()
    t.add(nll=6 * math.log(2), tokens=3, n_bytes=4)  # 6 bits in all
    t.add(nll=2 * math.log(2), tokens=1, n_bytes=4)  # 2 more bits
    m = t.metrics()
    assert m["bits_per_byte"] == pytest.approx(8 / 8)
    assert m["perplexity"] == pytest.approx(2**2)  # 8 bits over 4 tokens: 2 bits per token
    assert m["bytes_per_token"] == pytest.approx(2)
    assert t.documents == 2
