"""Segmented mixed-rank expand: ``y[order[p]] (+)= s_k * h[p, :r_k] W_k`` in one launch.

Used by the forward (``y = s_k h B_k``) and the backward (``dx = g A_k``).  The rank is
the reduction dimension here: a program loops over ``ceil(r_k / BLOCK_R)`` rank tiles of
its own adapter, read from the layout at run time, so a rank-1 adapter costs one tile
whatever ``r_max`` is.  Output rows are scattered through ``groups.order``.
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
from .tile_ops import adapter_rows, dot_acc, out_tile, scaled, store_rows, tile_of, tile_tokens

_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2))
]


# restore_value: with ACCUMULATE the kernel updates Y in place, and the autotuner's
# timing runs must not add the delta several times
@autotune(
    _CONFIGS,
    key=["d_out", "BLOCK_T"],
    prune_configs_by={"early_config_prune": prune_wide_blocks("BLOCK_N", "d_out")},
    restore_value=["Y"],
)
@triton.jit
def _expand_kernel(
    H,  # [T, r_max] fp32, by position
    stride_h,
    W,  # [R, d_out] packed factor (B, or A in the backward)
    stride_w,
    Y,  # [T, d_out] output, by token (row stride stride_y, unit column stride)
    stride_y,
    order,
    tiles,  # [n_tiles, 3] int32 (adapter or -1, p_start, p_end)
    offsets,
    scale_ptr,
    scale_val,
    d_out,
    HAS_SCALE_PTR: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    a, p0, p1 = tile_of(tiles, pid_t)
    offs_p, mask_t, tok = tile_tokens(order, p0, p1, BLOCK_T)
    offs_n, mask_n, y_ptrs, mask_y = out_tile(Y, stride_y, tok, mask_t, pid_n, d_out, BLOCK_N)
    if a < 0:
        # tokens of no adapter: the buffer comes from torch.empty, so write their zeros
        if not ACCUMULATE:
            tl.store(y_ptrs, tl.zeros((BLOCK_T, BLOCK_N), dtype=Y.dtype.element_ty), mask=mask_y)
    else:
        row0, rank = adapter_rows(offsets, a)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            mask_h = mask_t[:, None] & mask_r[None, :]
            ht = tl.load(H + offs_p[:, None] * stride_h + offs_r[None, :], mask=mask_h, other=0.0)
            mask_w = mask_r[:, None] & mask_n[None, :]
            wt = tl.load(W + (row0 + offs_r)[:, None] * stride_w + offs_n[None, :], mask=mask_w, other=0.0)
            acc = dot_acc(ht, wt, acc, DOT_F32, DOT_PREC, W.dtype.element_ty)
        store_rows(y_ptrs, scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR), mask_y, ACCUMULATE)


def expand(
    h: torch.Tensor,
    W: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor = 1.0,
    out: torch.Tensor | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """``y[order[p]] = s_k * h[p, :r_k] @ W_k`` (or ``+=`` into ``out``).

    Args:
        h: fp32 ``[T, r_max]`` by position, as `shrink` returns it.
        W: ``[R, d]`` contiguous fp32/fp16/bf16, packed for ``layout``.
        scaling: float, or fp32 ``[K]`` tensor on h's device.
        out: ``[T, d]`` in W's dtype with unit column stride to accumulate into; rows of
            ``-1`` tokens are left as they are.  Without it a new ``[T, d]`` tensor is
            returned with zeros in the rows of ``-1`` tokens.
    Returns:
        ``out``, or the new ``[T, d]`` tensor in W's dtype.
    """
    T, d = h.shape[0], W.shape[1]
    accumulate = out is not None
    y = out if accumulate else torch.empty(T, d, dtype=W.dtype, device=W.device)
    if T == 0 or d == 0:
        return y
    block_t = block_t or shrink_block_t(groups)
    tiles = routed_tiles(groups, block_t) if accumulate else token_tiles(groups, block_t)[0]
    if tiles.shape[0] == 0:
        return y
    offsets = layout.offsets_tensor(W.device)
    scale_ptr, scale_val, has_ptr = torch_to_tl_scale(scaling, W.device, offsets)
    dot_f32, prec = dot_mode(W.dtype)
    n_tiles = tiles.shape[0]

    def grid(meta):
        return (cdiv(d, meta["BLOCK_N"]), n_tiles)

    launch(_expand_kernel, grid)(
        h, h.stride(0), W, W.stride(0), y, y.stride(0), groups.order, tiles, offsets, scale_ptr, scale_val, d,
        HAS_SCALE_PTR=has_ptr, ACCUMULATE=accumulate, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_T=block_t,
        BLOCK_R=BLOCK_R, **interpret_meta(BLOCK_N=min(256, max(16, next_pow2(d)))),
    )  # fmt: skip
    return y
