"""bf16 matmuls on CPUs without bf16 arithmetic: the same numbers, through the fp32 BLAS.

On a CPU without AVX512-BF16 or AMX (every AMD chip before Zen 4, Intel before Cooper Lake), bf16
`mm`/`linear` and bf16 flash attention in torch run through generic oneDNN / ATen code paths that
are 7-10x slower than fp32 here (about 10 GFLOP/s against 70-150 on this 2-core EPYC): a bf16
training step took 5 s where the fp32 one took 0.6 s. There is no bf16 FMA on these CPUs, so any
bf16 GEMM must widen its inputs to fp32 and accumulate in fp32. This module does exactly that, with
MKL's fast fp32 kernels:

    linear(x, w) in bf16  ==  linear(x.to(bf16).float(), w.to(bf16).float()).to(bf16)

The products of bf16 values are exact in fp32 and the accumulation is fp32 in both, so the result
is what a native bf16 kernel gives, up to the order of the summation. Gradients follow autocast's
rules: each matmul's gradient is a bf16 GEMM result (rounded to bf16), returned in the input's
dtype. Attention is computed in fp32 from bf16-rounded q/k/v and its output rounded to bf16 (the
native CPU kernel keeps its softmax in fp32 too; it also rounds the probabilities to bf16 before
P @ V, which this path does not).

`Runtime.autocast()` turns it on for bf16 on such CPUs (`matmuls()`: a `TorchFunctionMode` that
routes `F.linear`, `mm`/`matmul`/`bmm`/`@` and `F.scaled_dot_product_attention` here while CPU
autocast is in bf16 or the operands are bf16). Products of fewer than 8 rows (decode steps) stay
on torch's kernel, which is faster there than widening the weights. `LLMCTL_CPU_BF16=native` keeps
torch's own kernels throughout.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BF16 = torch.bfloat16


_native: bool | None = None  # cached answer of native_bf16_cpu (a plain global: torch.compile-safe)


def native_bf16_cpu() -> bool:
    """Whether this CPU does bf16 arithmetic natively (oneDNN's check: AVX512-BF16 or AMX)."""
    global _native
    if _native is None:
        try:
            _native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            _native = False
    return _native


def emulate() -> bool:
    """Whether bf16 matmuls on this CPU should go through fp32 (no native bf16, not overridden)."""
    return not native_bf16_cpu() and os.environ.get("LLMCTL_CPU_BF16", "").lower() != "native"


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D tensors, bf16 ones computed as above on CPUs that need it (no autograd)."""
    if a.dtype == BF16 and b.dtype == BF16 and a.device.type == "cpu" and emulate():
        return torch.mm(a.float(), b.float()).to(BF16)
    return torch.mm(a, b)


def active() -> bool:
    """Whether `matmuls()` is in effect here (activation checkpointing re-enters it for the
    recompute, which otherwise runs torch's kernels and saves tensors of other shapes)."""
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(m, _Bf16Matmuls) for m in _get_current_function_mode_stack())


@contextlib.contextmanager
def matmuls() -> Iterator[None]:
    """Route bf16 CPU matmuls and attention through fp32 kernels while active (see the module
    docstring). A no-op on CPUs with native bf16."""
    if not emulate():
        yield
        return
    if "torch._inductor.config" in sys.modules:
        # torch.compile'd code would otherwise drop the x.to(bf16).float() round trips.
        sys.modules["torch._inductor.config"].emulate_precision_casts = True
    with _Bf16Matmuls():
        yield


# ------------------------------------------------------------------------------------------------


def _no_double_backward() -> None:
    # The saved operands are bf16 copies outside the graph: a differentiable backward
    # (create_graph=True: gradient penalties, Hessian-vector products) would silently drop terms.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) is not supported by llmctl's bf16 path on this "
            "CPU; set LLMCTL_CPU_BF16=native to use torch's bf16 kernels"
        )


def _round(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, widened back to fp32 (exact)."""
    return t.to(BF16).float()


class _Linear(torch.autograd.Function):
    """y = x @ w.T (+ b) with bf16 operands through fp32 GEMMs. Saves the bf16 operands, as the
    native bf16 linear would."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
        xb, wb = x.to(BF16), w.to(BF16)
        y = F.linear(xb.float(), wb.float(), None if b is None else _round(b)).to(BF16)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype)
        return y

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, g):  # noqa: ANN001, ANN205
        _no_double_backward()
        xb, wb = ctx.saved_tensors
        xd, wd, bd = ctx.dtypes
        g = _round(g)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ wb.float()).to(BF16).to(xd)
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, g.shape[-1])
            gw = torch.mm(g2.t(), xb.reshape(-1, xb.shape[-1]).float()).to(BF16).to(wd)
        if bd is not None and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(BF16).to(bd)
        return gx, gw, gb


class _Matmul(torch.autograd.Function):
    """torch.matmul(a, b) with bf16 operands through fp32 (any shapes matmul accepts, >= 2-D)."""

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, a, b):  # noqa: ANN001, ANN205
        ab, bb = a.to(BF16), b.to(BF16)
        ctx.save_for_backward(ab, bb)
        ctx.dtypes = (a.dtype, b.dtype)
        return torch.matmul(ab.float(), bb.float()).to(BF16)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, g):  # noqa: ANN001, ANN205
        _no_double_backward()
        ab, bb = ctx.saved_tensors
        ad, bd = ctx.dtypes
        g = _round(g)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _sum_to(torch.matmul(g, bb.float().mT), ab.shape).to(BF16).to(ad)
        if ctx.needs_input_grad[1]:
            gb = _sum_to(torch.matmul(ab.float().mT, g), bb.shape).to(BF16).to(bd)
        return ga, gb


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo matmul's batch broadcasting in a gradient."""
    while t.ndim > len(shape):
        t = t.sum(0)
    dims = [i for i, (n, m) in enumerate(zip(t.shape, shape, strict=True)) if m == 1 and n != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # noqa: ANN001, ANN202
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = _round(mask)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(
            _round(q),
            _round(k),
            _round(v),
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    return y.to(BF16)


def _cpu_float(*ts: object) -> bool:
    return all(
        isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in (torch.float32, BF16)
        for t in ts
    )


def _active(*ts: torch.Tensor) -> bool:
    """Whether these operands would run as a bf16 matmul: CPU autocast in bf16, or all bf16."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16:
        return True
    return all(t.dtype == BF16 for t in ts)


def _few_rows(x: torch.Tensor) -> bool:
    """A product with this few rows (a decode step) is cheaper in torch's bf16 kernel, whose cost
    grows with the rows, than widening the whole weight to fp32 (a fixed cost): measured crossover
    at about 6 rows."""
    return x.numel() < _MIN_ROWS * x.shape[-1]


_MIN_ROWS = 8


def _linear(args: tuple, kwargs: dict) -> object:
    x, w, *rest = args
    b = rest[0] if rest else kwargs.get("bias")
    operands = (x, w) if b is None else (x, w, b)
    if not (_cpu_float(*operands) and _active(*operands)) or _few_rows(x):
        return NotImplemented
    if x.ndim < 1 or w.ndim != 2 or (b is not None and b.ndim != 1):
        return NotImplemented  # unusual shapes: torch's kernel (and its errors)
    return _Linear.apply(x, w, b)


def _matmul(args: tuple, kwargs: dict) -> object:
    if kwargs or len(args) != 2:  # out= and friends: leave to torch
        return NotImplemented
    a, b = args
    if not (_cpu_float(a, b) and a.ndim >= 2 and b.ndim >= 2 and _active(a, b)):
        return NotImplemented
    # Decode-sized either way round: (rows, d) @ W.T, or W @ (rows, d).T (`model._decode_linear`).
    if _few_rows(a) or b.shape[-1] < _MIN_ROWS:
        return NotImplemented
    return _Matmul.apply(a, b)


def _mm(args: tuple, kwargs: dict) -> object:
    if len(args) == 2 and not (args[0].ndim == args[1].ndim == 2):
        return NotImplemented  # torch raises its own error
    return _matmul(args, kwargs)


def _bmm(args: tuple, kwargs: dict) -> object:
    if len(args) == 2 and not (
        args[0].ndim == args[1].ndim == 3 and args[0].shape[0] == args[1].shape[0]
    ):
        return NotImplemented
    return _matmul(args, kwargs)


def _rmatmul(args: tuple, kwargs: dict) -> object:
    return _matmul(args[::-1], kwargs)


def _attention(args: tuple, kwargs: dict) -> object:
    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args) :])[:3]
    if not (_cpu_float(q, k, v) and _active(q, k, v)) or _few_rows(q):
        return NotImplemented
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if mask is not None and not (mask.dtype == torch.bool or _cpu_float(mask)):
        return NotImplemented
    kw = dict(kwargs)
    for name in ("query", "key", "value"):
        kw.pop(name, None)
    return _sdpa(q, k, v, *args[3:], **kw)


_HANDLERS: dict[Callable, Callable[[tuple, dict], object]] = {
    F.linear: _linear,
    torch.mm: _mm,
    torch.matmul: _matmul,
    torch.bmm: _bmm,
    torch.Tensor.mm: _mm,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.bmm: _bmm,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: _rmatmul,
    F.scaled_dot_product_attention: _attention,
}


class _Bf16Matmuls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)
