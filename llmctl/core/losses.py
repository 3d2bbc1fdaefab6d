"""Fused LM head + cross entropy: the loss without the (rows, vocab) logits.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)` but walks the rows in
chunks: each chunk's logits are computed, turned into the loss and, when a gradient is wanted, at
once into that chunk's share of grad_hidden and grad_weight, then dropped. The full fp32 logits
(rows x vocab x 4 bytes: 64 MB for 2048 tokens at vocab 8192, 1 GB at 8 x 1024 tokens and 32k) are
never held, and each chunk is still in cache when its softmax and its two gradient matmuls read it.
Computing the gradients in the forward pass (as Liger-Kernel does) is exact for a scalar loss: the
backward only scales them by the incoming gradient (1 / grad_accum, say), so nothing is recomputed
and the head costs the same three matmuls as the unfused version.

`token_logprobs(hidden, weight, targets)` gives log p(target) per position, chunked the same way,
for the post-training losses (DPO, PPO) that weigh tokens individually. Its gradient depends on the
incoming per-token weights, so its backward recomputes each chunk's logits (one extra matmul).

Precision: logits, softmax and loss are fp32 whatever the inputs; the matmuls run in the autocast
dtype when autocast is on (as `nn.Linear` would), in the inputs' dtype otherwise (bf16 ones through
fp32 kernels on CPUs without bf16 arithmetic, `core/cpu_bf16.py`); grad_weight is accumulated in
fp32. The gradients are returned in the dtypes of hidden and weight.
"""

from __future__ import annotations

import torch

from llmctl.core.cpu_bf16 import mm

IGNORE_INDEX = (
    -100
)  # targets with this value add no loss and get no gradient (F.cross_entropy's default)
_CHUNK_ELEMENTS = 1 << 21  # logits per chunk on CPU (8 MB in fp32); 16x that on GPU


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross entropy of `hidden @ weight.T` against `targets`, without materialising the logits.

    Args:
        hidden: (..., d) final hidden states.
        weight: (vocab, d) LM head (or tied embedding) matrix.
        targets: (...) token ids; `ignore_index` marks positions without a loss.
        ignore_index: Target value to skip.
        reduction: "mean" over the non-ignored targets (0 when there are none) or "sum".
        chunk_rows: Rows per chunk (default: about 2M logits per chunk on CPU, 32M on GPU).

    Returns:
        A scalar fp32 tensor, differentiable w.r.t. hidden and weight.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h, t = _flatten(hidden, weight, targets)
    rows = chunk_rows or _default_chunk(weight)
    # Inside Function.forward grad mode is always off and needs_input_grad ignores no_grad, so
    # whether to compute the gradients is decided here.
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, t, ignore_index, reduction == "mean", rows, grad)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[target] per position, chunked and differentiable.

    Args:
        hidden: (..., d) final hidden states.
        weight: (vocab, d) LM head matrix.
        targets: (...) token ids; positions equal to `ignore_index` get 0 (and no gradient).
        ignore_index: Target value to skip.
        chunk_rows: Rows per chunk (default: about 2M logits per chunk on CPU, 32M on GPU).

    Returns:
        fp32 tensor shaped like `targets`.
    """
    h, t = _flatten(hidden, weight, targets)
    rows = chunk_rows or _default_chunk(weight)
    return _TokenLogprobs.apply(h, weight, t, ignore_index, rows).view(targets.shape)


# ------------------------------------------------------------------------------------------------


def _flatten(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
            f"{tuple(targets.shape)} do not fit: want (..., d), (vocab, d), (...)"
        )
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _default_chunk(weight: torch.Tensor) -> int:
    # CPU: about 2M logits (8 MB), so a chunk stays in cache between its matmul, softmax and
    # gradient matmuls. GPU: 32M, few launches; memory is still bounded.
    elements = _CHUNK_ELEMENTS if weight.device.type == "cpu" else 16 * _CHUNK_ELEMENTS
    return max(16, elements // weight.shape[0])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _chunk_logits_t(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk, transposed: (vocab, rows). `w @ h.T` is the faster GEMM layout on
    CPU (the reduction dim is only d_model) and the per-row softmax becomes a column-wise one."""
    return mm(w, h.t()).float()


def _softmax_columns_(logits_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: logits (V, r) -> exp(logits - max) per column; returns (max, sum) per column."""
    m = logits_t.amax(dim=0)
    logits_t.sub_(m).exp_()
    return m, logits_t.sum(dim=0)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, mean, rows, grad):  # noqa: ANN001, ANN205
        dtype = _compute_dtype(hidden)
        want_h, want_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            n_valid = valid.sum()
            # Per-row weight of the loss: 1 / n_valid (mean) or 1 (sum); 0 for ignored rows.
            row_w = valid.float() / n_valid.clamp(min=1) if mean else valid.float()
            safe = torch.where(valid, targets, 0)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if (want_w)
                else None
            )
            for r0 in range(0, h.shape[0], rows):
                hc, tc, wc = h[r0 : r0 + rows], safe[r0 : r0 + rows, None], row_w[r0 : r0 + rows]
                lt = _chunk_logits_t(hc, w)  # (V, r)
                picked = lt.t().gather(1, tc).squeeze(1)
                m, z = _softmax_columns_(lt)
                total += ((z.log() + m - picked) * wc).sum()  # nll = logsumexp - logit[target]
                if not (want_h or want_w):
                    continue
                # d(loss)/d(logits) = row weight * (softmax - onehot(target)).
                g = lt.mul_(wc / z)
                g.t().scatter_add_(1, tc, -wc[:, None])
                g = g.to(dtype)
                if want_h:
                    grad_h[r0 : r0 + rows] = mm(g.t(), w)
                if want_w:
                    grad_w.addmm_(g, hc) if dtype == torch.float32 else grad_w.add_(mm(g, hc))
        if want_h or want_w:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):  # noqa: ANN001, ANN205
        dtype = _compute_dtype(hidden)
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            for r0 in range(0, h.shape[0], rows):
                lt = _chunk_logits_t(h[r0 : r0 + rows], w)
                picked = lt.t().gather(1, safe[r0 : r0 + rows, None]).squeeze(1)
                m, z = _softmax_columns_(lt)
                lse[r0 : r0 + rows] = z.log() + m
                out[r0 : r0 + rows] = picked - lse[r0 : r0 + rows]
            out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.dtype, ctx.rows = dtype, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, rows = ctx.dtype, ctx.rows
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        go = torch.where(valid, grad_out.float(), 0.0)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            for r0 in range(0, h.shape[0], rows):
                hc, tc, gc = h[r0 : r0 + rows], safe[r0 : r0 + rows, None], go[r0 : r0 + rows]
                # d logp[t] / d logits = onehot(t) - softmax, times the incoming gradient per row.
                g = _chunk_logits_t(hc, w).sub_(lse[r0 : r0 + rows]).exp_().mul_(-gc)
                g.t().scatter_add_(1, tc, gc[:, None])
                g = g.to(dtype)
                if want_h:
                    grad_h[r0 : r0 + rows] = mm(g.t(), w)
                if want_w:
                    grad_w.addmm_(g, hc) if dtype == torch.float32 else grad_w.add_(mm(g, hc))
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None
