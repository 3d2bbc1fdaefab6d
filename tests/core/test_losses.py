"""Tests for llmctl.core.losses: the fused chunked LM head + cross entropy equals the unfused one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.losses import linear_cross_entropy, token_logprobs
from llmctl.core.model import ModelConfig, Transformer

N, D, V = 37, 16, 101  # rows not a multiple of the chunk, so the last chunk is short


def _inputs(
    seed: int = 0, ignore_every: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    weight = (torch.randn(V, D, generator=g) / D**0.5).float()
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def _grads(loss_fn, hidden, weight, targets, upstream=None):  # noqa: ANN001, ANN202
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = loss_fn(h, w, targets)
    (out * (upstream if upstream is not None else 1.0)).sum().backward()
    return out.detach(), h.grad, w.grad


def _reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), t, **kw)


@pytest.mark.parametrize("ignore_every", [0, 3])
@pytest.mark.parametrize("chunk_rows", [None, 1, 8, 64])
def test_fused_cross_entropy_equals_full_logits(ignore_every: int, chunk_rows: int | None) -> None:
    hidden, weight, targets = _inputs(ignore_every=ignore_every)
    ref = _grads(_reference, hidden, weight, targets)
    got = _grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=chunk_rows),
        hidden,
        weight,
        targets,
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sum_reduction_and_upstream_scale() -> None:
    hidden, weight, targets = _inputs(ignore_every=4)
    ref = _grads(
        lambda h, w, t: _reference(h, w, t, reduction="sum"), hidden, weight, targets, 0.25
    )
    got = _grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, reduction="sum", chunk_rows=5),
        hidden,
        weight,
        targets,
        0.25,
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads() -> None:
    hidden, weight, _ = _inputs()
    targets = torch.full((N,), -100)
    loss, gh, gw = _grads(linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0.0
    assert not gh.any()
    assert not gw.any()


def test_no_grad_gives_the_same_loss() -> None:
    hidden, weight, targets = _inputs(ignore_every=5)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets), atol=1e-6, rtol=1e-6)


def test_shape_mismatch_is_an_error() -> None:
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(hidden, weight, targets[:-1])


def _small_model(tied: bool) -> Transformer:
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=32,
        tie_embeddings=tied,
    )
    torch.manual_seed(0)
    return Transformer(cfg).train()


@pytest.mark.parametrize("tied", [True, False])
def test_model_forward_with_targets_equals_logits_loss(tied: bool) -> None:
    """Loss and every parameter gradient (the tied embedding/head included) match the unfused path."""
    model = _small_model(tied)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 20), generator=g)
    targets = torch.randint(0, 97, (3, 20), generator=g)
    targets[0, :5] = -100

    loss_ref = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten())
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss = model(ids, targets=targets)
    loss.backward()
    assert loss.shape == ()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-5, msg=n)


def test_model_forward_with_targets_under_bf16_autocast_is_close() -> None:
    model = _small_model(True)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    targets = ids.roll(-1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten())
        loss = model(ids, targets=targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_token_logprobs_equals_log_softmax_gather(chunk_rows: int | None) -> None:
    hidden, weight, targets = _inputs(ignore_every=6)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(9))
    valid = targets != -100

    def ref_fn(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        return torch.where(valid, logp.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)

    ref = _grads(ref_fn, hidden, weight, targets, upstream)
    got = _grads(
        lambda h, w, t: token_logprobs(h, w, t, chunk_rows=chunk_rows),
        hidden,
        weight,
        targets,
        upstream,
    )
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_logprobs_keeps_the_batch_shape() -> None:
    hidden, weight, targets = _inputs()
    out = token_logprobs(hidden.view(1, N, D), weight, targets.view(1, N))
    assert out.shape == (1, N)
    assert (out <= 0).all()
