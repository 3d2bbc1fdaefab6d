"""bf16 matmuls through fp32 kernels (core/cpu_bf16.py): same numbers as torch's bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.core import cpu_bf16
from llmctl.core.losses import linear_cross_entropy, token_logprobs
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.runtime import Runtime

BF16 = torch.bfloat16


@pytest.fixture
def emulated(monkeypatch):
    """Run as on a CPU without native bf16, whatever this one has."""
    monkeypatch.setattr(cpu_bf16, "_native", False)
    monkeypatch.delenv("LLMCTL_CPU_BF16", raising=False)


def _close(a: torch.Tensor, b: torch.Tensor, ulps: float = 2.0) -> None:
    """Equal up to a couple of bf16 roundings (summation order differs), relative to the scale."""
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    scale = b.float().abs().max().clamp(min=1e-6)
    assert (a.float() - b.float()).abs().max() <= ulps * 2**-8 * scale


def _grads(fn, *leaves):
    for t in leaves:
        t.grad = None
    out = fn()
    (out.float() ** 2).sum().backward()
    return [out.detach()] + [t.grad.clone() for t in leaves]


def _leaf(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_linear_matches_torch_autocast(emulated):
    x, w, b = _leaf(3, 17, 64, seed=0), _leaf(48, 64, seed=1), _leaf(48, seed=2)

    def run(ctx):
        def fn():
            with ctx():
                return F.linear(x, w, b)

        return _grads(fn, x, w, b)

    ref = run(lambda: torch.autocast("cpu", dtype=BF16))
    ours = run(lambda: Runtime(torch.device("cpu"), "bf16").autocast())
    assert ours[0].dtype == BF16
    assert [g.dtype for g in ours[1:]] == [torch.float32] * 3
    for a, r in zip(ours, ref, strict=True):
        _close(a, r)
    # The gradients are bf16 GEMM results, as autocast's are: representable in bf16.
    for g in ours[1:]:
        assert torch.equal(g, g.to(BF16).float())


def test_matmul_broadcast_and_operator_forms(emulated):
    a, b = _leaf(2, 3, 5, 8, seed=3), _leaf(8, 6, seed=4)
    for form in (torch.matmul, lambda p, q: p @ q, torch.Tensor.matmul):

        def run(ctx, form=form):
            def fn():
                with ctx():
                    return form(a, b)

            return _grads(fn, a, b)

        ref = run(lambda: torch.autocast("cpu", dtype=BF16))
        ours = run(cpu_bf16_autocast)
        for x, r in zip(ours, ref, strict=True):
            _close(x, r)


def cpu_bf16_autocast():
    return Runtime(torch.device("cpu"), "bf16").autocast()


def test_bf16_operands_without_autocast(emulated):
    a = torch.randn(32, 16).to(BF16)
    b = torch.randn(16, 24).to(BF16)
    with cpu_bf16.matmuls():
        out = torch.mm(a, b)
    assert out.dtype == BF16
    _close(out, torch.mm(a, b))
    _close(cpu_bf16.mm(a, b), torch.mm(a, b))


def test_decode_sized_products_stay_on_torch_kernels(emulated):
    x, w = torch.randn(1, 3, 64), torch.randn(48, 64)
    with torch.autocast("cpu", dtype=BF16):
        ref = F.linear(x, w)
    with cpu_bf16_autocast():
        out = F.linear(x, w)
    assert torch.equal(out, ref)


def test_fp32_untouched_outside_autocast(emulated):
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with cpu_bf16.matmuls():
        y = F.linear(x, w)
    assert y.dtype == torch.float32
    assert torch.equal(y, F.linear(x, w))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_gqa(emulated, causal):
    q, k, v = _leaf(2, 4, 16, 8, seed=5), _leaf(2, 2, 16, 8, seed=6), _leaf(2, 2, 16, 8, seed=7)

    def run(ctx):
        def fn():
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        return _grads(fn, q, k, v)

    ref = run(lambda: torch.autocast("cpu", dtype=BF16))
    ours = run(cpu_bf16_autocast)
    assert ours[0].dtype == BF16
    for a, r in zip(ours, ref, strict=True):
        # The native kernel rounds the probabilities to bf16 before P @ V; this path keeps fp32.
        _close(a, r, ulps=4.0)


def test_model_loss_and_grads_match_native_autocast(emulated):
    cfg = ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=32
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def run(ctx):
        model.zero_grad(set_to_none=True)
        with ctx():
            loss = model(ids, targets=ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_g = run(lambda: torch.autocast("cpu", dtype=BF16))
    loss, g = run(cpu_bf16_autocast)
    assert abs(loss.item() - ref_loss.item()) < 2e-3 * ref_loss.item()
    for name in ref_g:
        cos = F.cosine_similarity(g[name].flatten(), ref_g[name].flatten(), dim=0)
        assert cos > 0.995, name


def test_token_logprobs_backward_runs_emulated(emulated, monkeypatch):
    h, w = _leaf(24, 16, seed=8), _leaf(40, 16, seed=9)
    t = torch.randint(0, 40, (24,), generator=torch.Generator().manual_seed(1))

    def run(ctx):
        h.grad = w.grad = None
        with ctx():
            lp = token_logprobs(h, w, t, chunk_rows=8)
            ce = linear_cross_entropy(h, w, t, chunk_rows=8)
        (lp.sum() + ce).backward()
        return lp.detach(), h.grad.clone(), w.grad.clone()

    ref = run(lambda: torch.autocast("cpu", dtype=BF16))
    calls = []
    real = torch.mm
    monkeypatch.setattr(
        cpu_bf16.torch, "mm", lambda a, b: calls.append((a.dtype, b.dtype)) or real(a, b)
    )
    ours = run(cpu_bf16_autocast)
    monkeypatch.undo()
    for a, r in zip(ours, ref, strict=True):
        _close(a, r, ulps=4.0)
    # Every GEMM of the head ran in fp32, backward included (which runs outside the autocast).
    assert calls
    assert all(c == (torch.float32, torch.float32) for c in calls)


def test_native_override(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "_native", False)
    monkeypatch.setenv("LLMCTL_CPU_BF16", "native")
    assert not cpu_bf16.emulate()
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with Runtime(torch.device("cpu"), "bf16").autocast():
        assert torch.is_autocast_enabled("cpu")
        y = F.linear(x, w)
    assert y.dtype == BF16
    assert not torch.is_autocast_enabled("cpu")


def test_activation_checkpointing_recomputes_in_the_same_mode(emulated):
    from llmctl.core.parallel import checkpoint_activations

    cfg = ModelConfig(
        vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16
    )
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if ckpt:
            checkpoint_activations(model)
        with cpu_bf16_autocast():
            loss = model(ids, targets=ids)
        loss.backward()  # recomputes each block in backward, outside the autocast block
        runs.append((loss.item(), [p.grad for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_wrong_ranks_raise_as_torch_does(emulated):
    a3, b2 = torch.randn(2, 16, 8), torch.randn(8, 16)
    with cpu_bf16_autocast():
        with pytest.raises(RuntimeError, match="matrix"):
            torch.mm(a3, b2)
        with pytest.raises(RuntimeError, match="3D"):
            torch.bmm(b2.t(), b2)
        assert torch.bmm(a3, torch.randn(2, 8, 16)).shape == (2, 16, 16)


def test_double_backward_refused(emulated):
    x, w = _leaf(16, 8, seed=10), _leaf(12, 8, seed=11)
    with cpu_bf16_autocast():
        z = F.linear(x, w).float().square().sum()
    with pytest.raises(RuntimeError, match="LLMCTL_CPU_BF16=native"):
        torch.autograd.grad(z, x, create_graph=True)
