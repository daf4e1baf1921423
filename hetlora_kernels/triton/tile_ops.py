"""Device-side pieces the mixed-rank LoRA kernels share (``@triton.jit`` helpers, inlined).

A tile is a row ``(adapter, p_start, p_end)`` of a schedule from `schedule.token_tiles` or
`schedule.token_chunks`; positions ``p`` index ``groups.order``.  Every block shape is a
``tl.constexpr``, so each helper compiles to the code its caller would hold inline.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_of(table, i):
    """``(adapter, p_start, p_end)`` of row ``i`` of an int32 ``[n, 3]`` schedule."""
    return tl.load(table + i * 3), tl.load(table + i * 3 + 1), tl.load(table + i * 3 + 2)


@triton.jit
def adapter_rows(offsets, a):
    """``(first packed row, rank)`` of adapter ``a``."""
    row0 = tl.load(offsets + a)
    return row0, tl.load(offsets + a + 1) - row0


@triton.jit
def tile_tokens(order, p0, p1, BLOCK_T: tl.constexpr):
    """Positions ``p0 .. p0 + BLOCK_T``, the mask of those before ``p1``, and their tokens."""
    offs_p = p0 + tl.arange(0, BLOCK_T)
    mask_t = offs_p < p1
    return offs_p, mask_t, tl.load(order + offs_p, mask=mask_t, other=0)


@triton.jit
def out_tile(Y, stride_y, tok, mask_t, pid_n, d_out, BLOCK_N: tl.constexpr):
    """Column block ``pid_n`` of the output rows ``Y[tok]``: ``(offs_n, mask_n, y_ptrs, mask_y)``."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    return offs_n, mask_n, Y + tok[:, None] * stride_y + offs_n[None, :], mask_t[:, None] & mask_n[None, :]


@triton.jit
def scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR: tl.constexpr):
    """``acc * s_a``: a per-adapter fp32 scale from ``scale_ptr``, or the one ``scale_val``."""
    if HAS_SCALE_PTR:
        return acc * tl.load(scale_ptr + a)
    return acc * scale_val


@triton.jit
def dot_acc(p, q, acc, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, HALF: tl.constexpr):
    """``acc + p @ q``, accumulated in fp32: with DOT_F32 both operands in fp32 at ``DOT_PREC``,
    else both in the 16-bit input dtype ``HALF`` (an fp32 intermediate such as h is rounded
    to it, as the torch reference's half matmuls round theirs)."""
    if DOT_F32:
        return tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision=DOT_PREC)
    return tl.dot(p.to(HALF), q.to(HALF), acc)


@triton.jit
def rows_times_factor_t(
    X,
    stride_x,
    tok,
    mask_t,
    W,
    stride_w,
    row0,
    offs_r,
    mask_r,
    d_in,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``[BLOCK_T, BLOCK_R]``: ``X[tok] @ W[row0 + offs_r]^T`` over all ``d_in`` columns
    (the shrink product; rows past ``mask_t`` and ranks past ``mask_r`` come out 0)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_x + offs_k[None, :]
    w_ptrs = W + (row0 + offs_r)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        mask_k = offs_k < d_in - k0
        xt = tl.load(x_ptrs, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = dot_acc(xt, wt, acc, DOT_F32, DOT_PREC, W.dtype.element_ty)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def store_rows(y_ptrs, acc, mask_y, ACCUMULATE: tl.constexpr):
    """``y = acc`` (or ``y += acc`` with ACCUMULATE), cast to y's dtype."""
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask_y)
