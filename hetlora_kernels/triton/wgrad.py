"""Segmented weight gradients: ``dW_k = s_k * sum_{p in k} h[p, :r_k]^T X[order[p]]``.

``dA_k = sum g^T x`` (``h = g``, ``X = x``, scale 1) and ``dB_k = s_k sum h^T dy``
(``X = dy``).  Results are bitwise reproducible run to run: no atomics.  Each program
owns one (token chunk, rank tile, column block) and sums its chunk's tokens in a fixed
order.  With one chunk per adapter (the default where that gives the GPU enough
programs) it writes ``dW`` directly; otherwise each chunk writes an fp32 partial and a
second launch adds an adapter's partials in chunk order.

The product is computed transposed, ``dW_k^T [d, r] = X^T h``, so the wide column block
is the MMA's M dimension and the narrow rank tile its N dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import AdapterLayout, TokenGroups
from .launch import launch
from .schedule import (
    BLOCK_R,
    INTERPRET,
    autotune,
    cdiv,
    dot_mode,
    interpret_meta,
    next_pow2,
    prune_wide_blocks,
    sm_count,
    token_chunks,
    torch_to_tl_scale,
)
from .tile_ops import adapter_rows, dot_acc, scaled, tile_of, tile_tokens

# tests set this to force the two-stage path (chunks of this many tokens)
FORCE_CHUNK_T: int | None = None

_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bt, bn, w, s in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (32, 128, 4, 4))
]


@triton.jit
def _wgrad_tile(
    Hm, stride_h, X, stride_x, Out, stride_oc, stride_or, order, chunks, offsets, scale_ptr, scale_val, d, c,
    pid_r, pid_n,
    HAS_SCALE_PTR: tl.constexpr, DIRECT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program's work: rank tile ``pid_r`` and column block ``pid_n`` of chunk ``c``."""
    a, p0, p1 = tile_of(chunks, c)
    row0, rank = adapter_rows(offsets, a)
    r0 = pid_r * BLOCK_R
    if r0 < rank and pid_n * BLOCK_N < d:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for q in range(p0, p1, BLOCK_T):
            offs_p, mask_t, tok = tile_tokens(order, q, p1, BLOCK_T)
            mask_x = mask_n[:, None] & mask_t[None, :]
            xt = tl.load(X + tok[None, :] * stride_x + offs_n[:, None], mask=mask_x, other=0.0)
            mask_h = mask_t[:, None] & mask_r[None, :]
            ht = tl.load(Hm + offs_p[:, None] * stride_h + offs_r[None, :], mask=mask_h, other=0.0)
            acc = dot_acc(xt, ht, acc, DOT_F32, DOT_PREC, X.dtype.element_ty)
        mask = mask_n[:, None] & mask_r[None, :]
        if DIRECT:
            acc = scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR)
            o_ptrs = Out + (row0 + offs_r)[None, :] * stride_or + offs_n[:, None]
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask)
        else:
            o_ptrs = Out + c * stride_oc + offs_r[None, :] * stride_or + offs_n[:, None]
            tl.store(o_ptrs, acc, mask=mask)


@autotune(_CONFIGS, key=["d", "DIRECT"], prune_configs_by={"early_config_prune": prune_wide_blocks("BLOCK_N", "d")})
@triton.jit
def _wgrad_kernel(
    Hm,  # [T, r_max] fp32, by position (h or g)
    stride_h,
    X,  # [T, d] by token (x or dy), unit column stride
    stride_x,
    Out,  # DIRECT: [R, d] gradient; else [n_chunks, r_pad, d] fp32 partials
    stride_oc,
    stride_or,
    order,
    chunks,  # [n_chunks, 3] int32 (adapter, p_start, p_end)
    offsets,
    scale_ptr,
    scale_val,
    d,
    HAS_SCALE_PTR: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    _wgrad_tile(
        Hm, stride_h, X, stride_x, Out, stride_oc, stride_or, order, chunks, offsets, scale_ptr, scale_val, d,
        tl.program_id(2), tl.program_id(0), tl.program_id(1),
        HAS_SCALE_PTR, DIRECT, DOT_F32, DOT_PREC, BLOCK_R, BLOCK_T, BLOCK_N,
    )  # fmt: skip


@autotune(
    _CONFIGS, key=["d_max", "DIRECT"], prune_configs_by={"early_config_prune": prune_wide_blocks("BLOCK_N", "d_max")}
)
@triton.jit
def _wgrad_pair_kernel(
    G,  # [T, r_max] fp32 by position: g = s dy B^T (or dy B^T with SCALE_A: dA then takes s)
    stride_g,
    Xa,  # [T, d_in] by token: x
    stride_xa,
    OutA,  # DIRECT: dA [R, d_in]; else [n_chunks, r_pad, d_in] fp32 partials
    stride_ac,
    stride_ar,
    d_in,
    H,  # [T, r_max] fp32 by position: h
    stride_hh,
    Xb,  # [T, d_out] by token: dy
    stride_xb,
    OutB,  # DIRECT: dB [R, d_out]; else partials
    stride_bc,
    stride_br,
    d_out,
    order,
    chunks,
    n_chunks,
    offsets,
    scale_ptr,
    scale_val,
    d_max,
    HAS_SCALE_PTR: tl.constexpr,
    SCALE_A: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dA and dB in one launch: programs ``[0, n_chunks)`` of axis 2 compute dA's tiles, the
    rest dB's, each exactly as `_wgrad_kernel` would (same summation order, same bits).
    dB is scaled; dA only with SCALE_A (when G is the unscaled ``dy B^T``)."""
    c = tl.program_id(2)
    if c < n_chunks:
        if SCALE_A:
            _wgrad_tile(
                G, stride_g, Xa, stride_xa, OutA, stride_ac, stride_ar, order, chunks, offsets, scale_ptr,
                scale_val, d_in, c, tl.program_id(0), tl.program_id(1),
                HAS_SCALE_PTR and DIRECT, DIRECT, DOT_F32, DOT_PREC, BLOCK_R, BLOCK_T, BLOCK_N,
            )  # fmt: skip
        else:
            _wgrad_tile(
                G, stride_g, Xa, stride_xa, OutA, stride_ac, stride_ar, order, chunks, offsets, scale_ptr, 1.0,
                d_in, c, tl.program_id(0), tl.program_id(1),
                False, DIRECT, DOT_F32, DOT_PREC, BLOCK_R, BLOCK_T, BLOCK_N,
            )  # fmt: skip
    else:
        _wgrad_tile(
            H, stride_hh, Xb, stride_xb, OutB, stride_bc, stride_br, order, chunks, offsets, scale_ptr, scale_val,
            d_out, c - n_chunks, tl.program_id(0), tl.program_id(1),
            HAS_SCALE_PTR and DIRECT, DIRECT, DOT_F32, DOT_PREC, BLOCK_R, BLOCK_T, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _wgrad_reduce_kernel(
    P,  # [n_chunks, r_pad, d] fp32 partials
    stride_pc,
    stride_pr,
    Out,  # [R, d]
    stride_o,
    chunk_starts,  # [K+1] int32
    offsets,
    scale_ptr,
    scale_val,
    d,
    HAS_SCALE_PTR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    a = tl.program_id(2)
    row0, rank = adapter_rows(offsets, a)
    r0 = pid_r * BLOCK_R
    if r0 < rank:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_r < rank)[:, None] & (offs_n < d)[None, :]
        c0 = tl.load(chunk_starts + a)
        c1 = tl.load(chunk_starts + a + 1)
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        # a fixed summation order (chunk by chunk) keeps the result bitwise reproducible
        for c in range(c0, c1):
            acc += tl.load(P + c * stride_pc + offs_r[:, None] * stride_pr + offs_n[None, :], mask=mask, other=0.0)
        acc = scaled(acc, a, scale_ptr, scale_val, HAS_SCALE_PTR)
        tl.store(Out + (row0 + offs_r)[:, None] * stride_o + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=mask)


def _pick_chunk(groups: TokenGroups, layout: AdapterLayout, d: int, device: torch.device) -> int | None:
    """Token chunk for the two-stage path, or None for one program per adapter.

    One chunk per adapter needs no second pass, so it is kept while it already offers the
    GPU a few waves of programs, or while no adapter has many tokens.
    """
    if FORCE_CHUNK_T is not None:
        return FORCE_CHUNK_T
    if INTERPRET:
        return None
    biggest = max(groups.counts_list, default=0)
    if biggest <= 512:
        return None
    n_blocks = cdiv(d, 128)
    busy = [(r, c) for r, c in zip(layout.ranks, groups.counts_list) if c]
    rank_tiles = sum(cdiv(r, BLOCK_R) for r, _ in busy)
    target = 4 * sm_count(device)
    if rank_tiles * n_blocks >= target:
        return None
    # programs ~ (routed / chunk) * mean rank tiles * n_blocks: pick the chunk (>= 256 tokens,
    # a power of two so the schedule cache sees few keys) that gives about `target`
    want = cdiv(groups.num_routed * rank_tiles * n_blocks, target * len(busy))
    chunk = max(256, next_pow2(want))
    return None if chunk >= biggest else chunk


def wgrad(
    hm: torch.Tensor,
    X: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor = 1.0,
    chunk_t: int | None = None,
) -> torch.Tensor:
    """``dW[rows of k] = s_k * sum_{p in k} hm[p, :r_k]^T X[order[p]]`` for every adapter.

    Args:
        hm: fp32 ``[T, r_max]`` by position (``h`` from the forward or ``g``).
        X: ``[T, d]`` fp32/fp16/bf16 by token, unit column stride (any row stride).
        scaling: float, or fp32 ``[K]`` tensor on X's device.
        chunk_t: tokens per program (the two-stage path when an adapter has more); ``None``
            picks by heuristic (``_pick_chunk``).
    Returns:
        ``[R, d]`` in X's dtype; rows of adapters without tokens are zero.
    """
    d = X.shape[1]
    dev = X.device
    out = torch.empty(layout.total_rank, d, dtype=X.dtype, device=dev)
    if d == 0 or groups.num_routed == 0:
        return out.zero_()
    if chunk_t is None:
        chunk_t = _pick_chunk(groups, layout, d, dev)
    chunks, chunk_starts, _ = token_chunks(groups, chunk_t)
    n_chunks = chunks.shape[0]
    direct = n_chunks == layout.num_adapters  # one chunk per adapter: no second pass
    offsets = layout.offsets_tensor(dev)
    scale_ptr, scale_val, has_ptr = torch_to_tl_scale(scaling, dev, offsets)
    dot_f32, prec = dot_mode(X.dtype)
    r_tiles = cdiv(layout.max_rank, BLOCK_R)
    meta = interpret_meta(BLOCK_T=64, BLOCK_N=min(256, max(16, next_pow2(d))))
    if direct:
        dest, s_c, s_r = out, 0, out.stride(0)
        k_scale_ptr, k_scale_val = scale_ptr, scale_val
    else:
        r_pad = r_tiles * BLOCK_R
        dest = torch.empty(n_chunks, r_pad, d, dtype=torch.float32, device=dev)
        s_c, s_r = dest.stride(0), dest.stride(1)
        k_scale_ptr, k_scale_val = scale_ptr, 1.0

    def grid(meta):
        return (r_tiles, cdiv(d, meta["BLOCK_N"]), n_chunks)

    launch(_wgrad_kernel, grid)(
        hm, hm.stride(0), X, X.stride(0), dest, s_c, s_r, groups.order, chunks, offsets, k_scale_ptr,
        k_scale_val, d, HAS_SCALE_PTR=has_ptr and direct, DIRECT=direct, DOT_F32=dot_f32, DOT_PREC=prec,
        BLOCK_R=BLOCK_R, **meta,
    )  # fmt: skip
    if not direct:
        block_n = 128 if not INTERPRET else min(256, max(16, next_pow2(d)))
        launch(_wgrad_reduce_kernel, (r_tiles, cdiv(d, block_n), layout.num_adapters))(
            dest, s_c, s_r, out, out.stride(0), chunk_starts, offsets, scale_ptr, scale_val, d,
            HAS_SCALE_PTR=has_ptr, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
        )  # fmt: skip
    return out


def wgrad_pair(
    g: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    dy: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
    chunk_t: int | None = None,
    scale_a: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dA, dB) = (wgrad(g, x), wgrad(h, dy, scaling))`` in one launch (two more on the
    two-stage path), bitwise equal to the two calls at the same ``chunk_t`` and block sizes.
    With ``scale_a``, dA is ``wgrad(g, x, scaling)`` (``g`` unscaled, as the fused backward
    leaves it).

    Args:
        g, h: fp32 ``[T, r_max]`` by position.  x: ``[T, d_in]``, dy: ``[T, d_out]`` by token,
            one dtype, unit column stride.  scaling: float or fp32 ``[K]`` tensor on x's device.
        chunk_t: as in `wgrad` (``None``: picked for the pair's combined width).
    Returns ``dA [R, d_in]``, ``dB [R, d_out]`` in x's dtype.
    """
    d_in, d_out = x.shape[1], dy.shape[1]
    dev = x.device
    if d_in == 0 or d_out == 0 or groups.num_routed == 0:
        return (wgrad(g, x, layout, groups, scaling if scale_a else 1.0, chunk_t),
                wgrad(h, dy, layout, groups, scaling, chunk_t))
    if chunk_t is None:
        chunk_t = _pick_chunk(groups, layout, d_in + d_out, dev)
    dA = torch.empty(layout.total_rank, d_in, dtype=x.dtype, device=dev)
    dB = torch.empty(layout.total_rank, d_out, dtype=dy.dtype, device=dev)
    chunks, chunk_starts, _ = token_chunks(groups, chunk_t)
    n_chunks = chunks.shape[0]
    direct = n_chunks == layout.num_adapters
    offsets = layout.offsets_tensor(dev)
    scale_ptr, scale_val, has_ptr = torch_to_tl_scale(scaling, dev, offsets)
    dot_f32, prec = dot_mode(x.dtype)
    r_tiles = cdiv(layout.max_rank, BLOCK_R)
    d_max = max(d_in, d_out)
    meta = interpret_meta(BLOCK_T=64, BLOCK_N=min(256, max(16, next_pow2(d_max))))
    if direct:
        dest_a, dest_b = dA, dB
        sa, sb = (0, dA.stride(0)), (0, dB.stride(0))
    else:
        r_pad = r_tiles * BLOCK_R
        dest_a = torch.empty(n_chunks, r_pad, d_in, dtype=torch.float32, device=dev)
        dest_b = torch.empty(n_chunks, r_pad, d_out, dtype=torch.float32, device=dev)
        sa, sb = (dest_a.stride(0), dest_a.stride(1)), (dest_b.stride(0), dest_b.stride(1))

    def grid(meta):
        return (r_tiles, cdiv(d_max, meta["BLOCK_N"]), 2 * n_chunks)

    launch(_wgrad_pair_kernel, grid)(
        g, g.stride(0), x, x.stride(0), dest_a, sa[0], sa[1], d_in,
        h, h.stride(0), dy, dy.stride(0), dest_b, sb[0], sb[1], d_out,
        groups.order, chunks, n_chunks, offsets, scale_ptr, scale_val, d_max,
        HAS_SCALE_PTR=has_ptr, SCALE_A=scale_a, DIRECT=direct, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_R=BLOCK_R,
        **meta,
    )  # fmt: skip
    if not direct:
        block_n = 128 if not INTERPRET else min(256, max(16, next_pow2(d_max)))
        a_scale = (scale_ptr, scale_val, has_ptr) if scale_a else (offsets, 1.0, False)
        for dest, out, d, s_ptr, s_val, has in ((dest_a, dA, d_in, *a_scale),
                                                 (dest_b, dB, d_out, scale_ptr, scale_val, has_ptr)):
            launch(_wgrad_reduce_kernel, (r_tiles, cdiv(d, block_n), layout.num_adapters))(
                dest, dest.stride(0), dest.stride(1), out, out.stride(0), chunk_starts, offsets, s_ptr, s_val, d,
                HAS_SCALE_PTR=has, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
            )  # fmt: skip
    return dA, dB
