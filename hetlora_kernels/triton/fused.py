"""Fused mixed-rank forward for small batches: ``h = x A_k^T`` and ``y (+)= s_k h B_k`` in one launch.

Each program owns one token tile and one column block of ``y``.  For every rank tile of
its adapter (``ceil(r_k / BLOCK_R)`` of them, read from the layout at run time) it
computes the ``[BLOCK_T, BLOCK_R]`` slice of ``h`` over all of ``d_in`` and adds its
product with the matching rows of ``B_k`` to the output tile.  The programs of one token
tile thus each recompute ``h``: wasted arithmetic that costs nothing where the batch is
small (the data sits in L2 and the op is bound by launch latency), which is where the
launcher picks this kernel.  The column-block-0 program stores ``h`` for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import AdapterLayout, TokenGroups
from .launch import launch
from .schedule import (
    BLOCK_R,
    autotune,
    cdiv,
    dot_mode,
    interpret_meta,
    next_pow2,
    prune_wide_blocks,
    routed_tiles,
    token_tiles,
    torch_to_tl_scale,
)
from .shrink import shrink_block_t
from .tile_ops import adapter_rows, dot_acc, out_tile, rows_times_factor_t, scaled, store_rows, tile_of, tile_tokens

# tests set this: True / False force the fused / the two-launch forward, None decides
FORCE_FUSED: bool | None = None
# Limits of the fused forward (starting points, not yet tuned on a GPU): at most this many
# routed tokens, ranks up to this, and at most this many bytes of x re-read (from L2) by
# the column-block programs that each recompute h.
FUSED_MAX_TOKENS = 512
FUSED_MAX_RANK = 64
FUSED_MAX_REREAD_BYTES = 16 << 20

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (256, 64, 8, 2))
]


@autotune(
    _CONFIGS,
    key=["d_in", "d_out", "BLOCK_T"],
    prune_configs_by={"early_config_prune": prune_wide_blocks("BLOCK_N", "d_out")},
    restore_value=["Y"],
)
@triton.jit
def _fused_fwd_kernel(
    X,  # [T, d_in] by token, unit column stride
    stride_x,
    A,  # [R, d_in]
    stride_a,
    B,  # [R, d_out]
    stride_b,
    Y,  # [T, d_out] by token
    stride_y,
    H,  # [T, r_max] fp32 by position (written for the backward)
    stride_h,
    order,
    tiles,  # [n_tiles, 3] int32 (adapter or -1, p_start, p_end)
    offsets,
    scale_ptr,
    scale_val,
    d_in,
    d_out,
    HAS_SCALE_PTR: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    a, p0, p1 = tile_of(tiles, pid_t)
    offs_p, mask_t, tok = tile_tokens(order, p0, p1, BLOCK_T)
    offs_n, mask_n, y_ptrs, mask_y = out_tile(Y, stride_y, tok, mask_t, pid_n, d_out, BLOCK_N)
    if a < 0:
        if not ACCUMULATE:
            tl.store(y_ptrs, tl.zeros((BLOCK_T, BLOCK_N), dtype=Y.dtype.element_ty), mask=mask_y)
    else:
        row0, rank = adapter_rows(offsets, a)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h = rows_times_factor_t(
                X, stride_x, tok, mask_t, A, stride_a, row0, offs_r, mask_r, d_in, DOT_F32, DOT_PREC, BLOCK_T,
                BLOCK_R, BLOCK_K,
            )  # fmt: skip
            if pid_n == 0:
                tl.store(H + offs_p[:, None] * stride_h + offs_r[None, :], h, mask=mask_t[:, None] & mask_r[None, :])
            mask_b = mask_r[:, None] & mask_n[None, :]
            bt = tl.load(B + (row0 + offs_r)[:, None] * stride_b + offs_n[None, :], mask=mask_b, other=0.0)
            acc = dot_acc(h, bt, acc, DOT_F32, DOT_PREC, B.dtype.element_ty)
        store_rows(y_ptrs, scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR), mask_y, ACCUMULATE)


def use_fused(groups: TokenGroups, layout: AdapterLayout, d_in: int, d_out: int, elem_size: int) -> bool:
    """Whether the forward should take the fused kernel: small batches, where one launch
    instead of two matters more than recomputing ``h`` once per 128 output columns."""
    if FORCE_FUSED is not None:
        return FORCE_FUSED
    T = groups.num_routed
    reread = T * d_in * elem_size * cdiv(d_out, 128)
    return 0 < T <= FUSED_MAX_TOKENS and layout.max_rank <= FUSED_MAX_RANK and reread <= FUSED_MAX_REREAD_BYTES


def fused_forward(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
    out: torch.Tensor | None = None,
    zeroed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y[t] = s_k (x[t] A_k^T) B_k`` (or ``+=`` into ``out``) in one launch.

    Args:
        x: ``[T, d_in]`` fp32/fp16/bf16, unit column stride.  A: ``[R, d_in]``, B: ``[R, d_out]``
            contiguous, x's dtype.  scaling: float or fp32 ``[K]`` tensor on x's device.
        zeroed: h's undefined entries are zeros (as `shrink.shrink`'s ``zeroed``).
        out: ``[T, d_out]`` to accumulate into (rows of ``-1`` tokens untouched); without it
            a new tensor with zero rows for ``-1`` tokens.
    Returns:
        ``(y, h)``: y ``[T, d_out]`` in x's dtype; h fp32 ``[T, r_max]`` by position in
        ``groups.order``, as `shrink.shrink` returns it.
    """
    T, d_in = x.shape
    d_out = B.shape[1]
    accumulate = out is not None
    y = out if accumulate else torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    h = (torch.zeros if zeroed else torch.empty)(T, layout.max_rank, dtype=torch.float32, device=x.device)
    if T == 0 or d_out == 0:
        return y, h
    if d_in == 0:
        # d_in = 0: every delta is exactly 0
        h.zero_()
        if not accumulate:
            y.zero_()
        return y, h
    block_t = shrink_block_t(groups)
    tiles = routed_tiles(groups, block_t) if accumulate else token_tiles(groups, block_t)[0]
    if tiles.shape[0] == 0:
        return y, h
    offsets = layout.offsets_tensor(x.device)
    scale_ptr, scale_val, has_ptr = torch_to_tl_scale(scaling, x.device, offsets)
    dot_f32, prec = dot_mode(x.dtype)
    n_tiles = tiles.shape[0]

    def grid(meta):
        return (cdiv(d_out, meta["BLOCK_N"]), n_tiles)

    launch(_fused_fwd_kernel, grid)(
        x, x.stride(0), A, A.stride(0), B, B.stride(0), y, y.stride(0), h, h.stride(0), groups.order, tiles,
        offsets, scale_ptr, scale_val, d_in, d_out, HAS_SCALE_PTR=has_ptr, ACCUMULATE=accumulate,
        DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_T=block_t, BLOCK_R=BLOCK_R,
        **interpret_meta(BLOCK_N=min(256, max(16, next_pow2(d_out))), BLOCK_K=min(256, max(16, next_pow2(d_in)))),
    )  # fmt: skip
    return y, h
