"""Segmented mixed-rank shrink: ``h[p] = s_k * x[order[p]] A_k^T`` in one launch.

Used by the forward (``h = x A_k^T``, scale 1) and the backward
(``g = s_k dy B_k^T``).  Tokens stay where they are: rows are gathered through
``groups.order``.  The result is written by *position* ``p`` in ``order`` (row ``p`` of
an fp32 ``[T, r_max]`` buffer), so that the consumers (expand, weight gradients) read
each adapter's rows contiguously.  Only columns ``< r_k`` of adapter k's positions are
written; positions of ``-1`` tokens and columns ``>= r_k`` are never written nor read.
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
    torch_to_tl_scale,
)
from .tile_ops import adapter_rows, rows_times_factor_t, scaled, tile_of, tile_tokens

_CONFIGS = [
    triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bk, w, s in ((64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 8, 2))
]


@autotune(
    _CONFIGS, key=["d_in", "BLOCK_T"], prune_configs_by={"early_config_prune": prune_wide_blocks("BLOCK_K", "d_in")}
)
@triton.jit
def _shrink_kernel(
    X,  # [T, d_in] (row stride stride_x, unit column stride)
    stride_x,
    W,  # [R, d_in] packed factor (A, or B in the backward)
    stride_w,
    H,  # [T, r_max] fp32 output, by position
    stride_h,
    order,  # [T] int64
    tiles,  # [n_tiles, 3] int32 (adapter, p_start, p_end)
    offsets,  # [K+1] int64
    scale_ptr,  # [K] fp32 when HAS_SCALE_PTR
    scale_val,
    d_in,
    HAS_SCALE_PTR: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # rank tile on the fastest grid axis: the programs that share one x tile run together,
    # so x is read from DRAM once and from L2 for the other rank tiles
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    a, p0, p1 = tile_of(tiles, pid_t)
    row0, rank = adapter_rows(offsets, a)
    r0 = pid_r * BLOCK_R
    if r0 < rank:
        offs_p, mask_t, tok = tile_tokens(order, p0, p1, BLOCK_T)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        acc = rows_times_factor_t(
            X, stride_x, tok, mask_t, W, stride_w, row0, offs_r, mask_r, d_in, DOT_F32, DOT_PREC, BLOCK_T, BLOCK_R,
            BLOCK_K,
        )  # fmt: skip
        acc = scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR)
        h_ptrs = H + offs_p[:, None] * stride_h + offs_r[None, :]
        tl.store(h_ptrs, acc, mask=mask_t[:, None] & mask_r[None, :])


def shrink_block_t(groups: TokenGroups) -> int:
    """Token tile of the shrink/expand schedule: small when groups are small, so that a
    batch of many clients with a few tokens each wastes little of each tile."""
    routed = groups.num_routed
    mean = routed // max(groups.num_active, 1)  # num_active is cached on the groups
    return 64 if (mean >= 48 or routed == 0) else (32 if mean >= 24 else 16)


def shrink(
    x: torch.Tensor,
    W: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor = 1.0,
    block_t: int | None = None,
    zeroed: bool = False,
) -> torch.Tensor:
    """``h[p, :r_k] = s_k * x[order[p]] @ W_k^T`` for every routed position ``p``.

    Args:
        x: ``[T, d]`` fp32/fp16/bf16 with unit column stride (any row stride).
        W: ``[R, d]`` contiguous, x's dtype, packed for ``layout``.
        scaling: float, or fp32 ``[K]`` tensor on x's device.
        block_t: token tile (default: ``shrink_block_t(groups)``).
        zeroed: the undefined entries of h are zeros (a custom op's result must not hold garbage).
    Returns:
        fp32 ``[T, r_max]`` indexed by position in ``groups.order``; only the
        entries ``[p, j]`` with ``p`` a position of adapter k and ``j < r_k`` are defined.
    """
    T, d = x.shape
    h = (torch.zeros if zeroed else torch.empty)(T, layout.max_rank, dtype=torch.float32, device=x.device)
    if groups.num_routed == 0 or d == 0:
        if d == 0:
            h.zero_()
        return h
    block_t = block_t or shrink_block_t(groups)
    tiles = routed_tiles(groups, block_t)
    offsets = layout.offsets_tensor(x.device)
    scale_ptr, scale_val, has_ptr = torch_to_tl_scale(scaling, x.device, offsets)
    dot_f32, prec = dot_mode(x.dtype)
    grid = (cdiv(layout.max_rank, BLOCK_R), tiles.shape[0])
    launch(_shrink_kernel, grid)(
        x, x.stride(0), W, W.stride(0), h, h.stride(0), groups.order, tiles, offsets, scale_ptr, scale_val, d,
        HAS_SCALE_PTR=has_ptr, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_T=block_t, BLOCK_R=BLOCK_R,
        **interpret_meta(BLOCK_K=min(256, max(16, next_pow2(d)))),
    )  # fmt: skip
    return h
