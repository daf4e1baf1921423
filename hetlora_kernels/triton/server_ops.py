"""Triton backend of the server-side ops: every layer of a model in a constant number of launches.

Ops (signatures and return conventions of `hetlora_kernels.reference`'s ``*_impl``):

- ``component_norms_impl(As, Bs, layout) -> [L, K, r_max]``: ``||a_kj|| * ||b_kj||``, 0 past ``r_k``;
  differentiable (`_ComponentNorms`, a hand-written backward; a zero-norm row gets gradient 0).
- ``delta_fro_norms_impl(As, Bs, layout, scaling) -> [L, K]``: ``|s_k| sqrt(sum((A_k A_k^T)(B_k B_k^T)))``
  from tiles of the two ``r_k x r_k`` Gram matrices; never a ``d_out x d_in`` matrix.
- ``weighted_aggregate_impl(As, Bs, layout, weights, out_rank) -> ([A_g], [B_g])``: zero-padded
  weighted sum, deterministic (each output row sums its sources in a fixed order, no atomics).
- ``truncate_impl(As, Bs, layout) -> ([A], [B])``: rows ``0:r_k`` of the global factors per adapter.

Result dtypes: norms are float32 for fp32/fp16/bf16 inputs and float64 for float64 inputs (as the
reference); factors come back in the input dtype.  Accumulation is float32 (float64 for float64).

**Constant launches: a pointer table (multi-tensor launch).**  The layers of one call have one
layout but their own widths, strides and storage.  Each launch gets a small int64 device table with
one row per tensor: ``data_ptr()``, width and strides (and the output's pointer where there is
one).  A program reads its row, casts the address to a typed pointer
(``int64.to(tl.pointer_type(...))``) and walks that tensor; the grid's last axis is the table row.
So each op costs one kernel launch for all layers (``component_norms`` 1 forward + 1 backward,
``delta_fro_norms`` 1 plus a tiny torch reduction of the per-tile partial sums, ``weighted_aggregate``
and ``truncate`` 1 for A and B of every layer), plus one host-to-device copy of the table and the
output allocations.  Why not one arena tensor (concatenate all layers, one launch over it): that
copies every factor once more (a full extra read and write of the data these memory-bound ops
exist to read once) and needs a copy back out per layer.  Raw addresses were checked to work under
``TRITON_INTERPRET=1`` for CPU tensors (the interpreter dereferences host addresses), so the test
suite exercises the same code path as the GPU.  The kernels read strides from the table, so
non-contiguous inputs need no copy; outputs are fresh contiguous tensors.

The element type of a table's pointers is a compile-time constant (taken from a "witness" tensor
argument), so layers of different dtypes are served in one launch per dtype present (at most four,
still independent of the number of layers); in the usual case (one dtype) that is one launch.
float64 runs on the same kernels with float64 accumulators (so ``gradcheck`` exercises the
hand-written backward); there is no reference fallback, except for CUDA tensors while
``TRITON_INTERPRET=1`` is set (the interpreter would read device addresses as host memory).
The backward of ``component_norms`` is first-order only (``once_differentiable``): the HetLoRA
regulariser needs no more.

Under the interpreter bf16 arithmetic is wrong (ENVIRONMENT.md), so every loaded tile is
upcast to the accumulator type before any maths; on a GPU half-precision Gram tiles go to ``tl.dot``
as they are (their products are exact in the float32 accumulator), and float32 tiles use
``input_precision="ieee"`` so that norms meet the float32 tolerance (tf32 would cost ~3e-4).

Launches go through `_launch`, so callers (and the tests) can count them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import reference
from ..layout import AdapterLayout, to_device
from .launch import launch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

__all__ = [
    "component_norms_impl",
    "delta_fro_norms_impl",
    "weighted_aggregate_impl",
    "truncate_impl",
    "IMPLS",
]

# table layouts (int64 fields per row)
# norms tables: one row per layer
_F_A, _F_B, _F_DIN, _F_DOUT, _F_SA0, _F_SA1, _F_SB0, _F_SB1, _F_DA, _F_DB = range(10)
_NF_NORMS = 10
# copy tables (aggregate, truncate): one row per tensor (A and B of every layer)
_F_SRC, _F_DST, _F_COLS, _F_S0, _F_S1 = range(5)
_NF_COPY = 5


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _row_sumsq(ptr, d, s0, s1, rows, rmask, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of squares of rows ``rows`` of the [?, d] tensor at ``ptr`` (strides s0, s1): [BLOCK_R]."""
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    cols0 = tl.arange(0, BLOCK_D)
    for c0 in tl.range(0, d, BLOCK_D):
        cols = c0 + cols0
        m = rmask[:, None] & (cols[None, :] < d)
        x = tl.load(ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=m, other=0.0).to(ACC)
        acc += x * x
    return tl.sum(acc, axis=1)


@triton.jit
def _comp_norms_fwd_kernel(
    tab_ptr,  # int64 [L, NF]
    dest_ptr,  # int64 [R]: k * r_max + j of each packed row
    out_ptr,  # ACC [L, K * r_max], zero-filled
    na_ptr,  # ACC [L, R]: ||a|| per row (kept for the backward)
    nb_ptr,  # ACC [L, R]
    R,
    OUT_STRIDE,  # K * r_max
    witness_ptr,  # any tensor of the layers' dtype: fixes the element type of the table's pointers
    NF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    ety = witness_ptr.dtype.element_ty
    base = tab_ptr + layer * NF
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    a_ptr = tl.load(base + 0).to(tl.pointer_type(ety))
    b_ptr = tl.load(base + 1).to(tl.pointer_type(ety))
    na = tl.sqrt(
        _row_sumsq(a_ptr, tl.load(base + 2), tl.load(base + 4), tl.load(base + 5), rows, rmask, ACC, BLOCK_R, BLOCK_D)
    )
    nb = tl.sqrt(
        _row_sumsq(b_ptr, tl.load(base + 3), tl.load(base + 6), tl.load(base + 7), rows, rmask, ACC, BLOCK_R, BLOCK_D)
    )
    tl.store(na_ptr + layer * R + rows, na, mask=rmask)
    tl.store(nb_ptr + layer * R + rows, nb, mask=rmask)
    dest = tl.load(dest_ptr + rows, mask=rmask, other=0)
    tl.store(out_ptr + layer * OUT_STRIDE + dest, na * nb, mask=rmask)


@triton.jit
def _scale_rows(
    src, dst, d, s0, s1, coef, rows, rmask, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """``dst[rows] = coef[:, None] * src[rows]`` for a contiguous [?, d] ``dst``."""
    cols0 = tl.arange(0, BLOCK_D)
    for c0 in tl.range(0, d, BLOCK_D):
        cols = c0 + cols0
        m = rmask[:, None] & (cols[None, :] < d)
        x = tl.load(src + rows[:, None] * s0 + cols[None, :] * s1, mask=m, other=0.0).to(ACC)
        y = coef[:, None] * x
        tl.store(dst + rows[:, None] * d + cols[None, :], y.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _comp_norms_bwd_kernel(
    tab_ptr,  # int64 [L, NF] (with the dA / dB pointers filled in)
    dest_ptr,
    gout_ptr,  # ACC [L, K * r_max], contiguous
    na_ptr,
    nb_ptr,
    R,
    OUT_STRIDE,
    witness_ptr,
    NF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    ety = witness_ptr.dtype.element_ty
    base = tab_ptr + layer * NF
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    dest = tl.load(dest_ptr + rows, mask=rmask, other=0)
    g = tl.load(gout_ptr + layer * OUT_STRIDE + dest, mask=rmask, other=0.0)
    na = tl.load(na_ptr + layer * R + rows, mask=rmask, other=0.0)
    nb = tl.load(nb_ptr + layer * R + rows, mask=rmask, other=0.0)
    # d(||a|| ||b||)/da = ||b|| a / ||a||; at ||a|| = 0 the norm has no gradient: use 0 (as torch does)
    ca = tl.where(na > 0, g * nb / tl.where(na > 0, na, 1.0), 0.0)
    cb = tl.where(nb > 0, g * na / tl.where(nb > 0, nb, 1.0), 0.0)
    a_ptr = tl.load(base + 0).to(tl.pointer_type(ety))
    b_ptr = tl.load(base + 1).to(tl.pointer_type(ety))
    da_ptr = tl.load(base + 8).to(tl.pointer_type(ety))
    db_ptr = tl.load(base + 9).to(tl.pointer_type(ety))
    _scale_rows(
        a_ptr, da_ptr, tl.load(base + 2), tl.load(base + 4), tl.load(base + 5), ca, rows, rmask, ACC, BLOCK_R, BLOCK_D
    )
    _scale_rows(
        b_ptr, db_ptr, tl.load(base + 3), tl.load(base + 6), tl.load(base + 7), cb, rows, rmask, ACC, BLOCK_R, BLOCK_D
    )


@triton.jit
def _gram_tile(
    ptr,
    d,
    s0,
    s1,
    rows_i,
    mask_i,
    rows_j,
    mask_j,
    ACC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tile ``X[rows_i] X[rows_j]^T`` of a Gram matrix, [BLOCK_T, BLOCK_T] in ACC."""
    g = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC)
    cols0 = tl.arange(0, BLOCK_D)
    for c0 in tl.range(0, d, BLOCK_D):
        cols = c0 + cols0
        cm = cols[None, :] < d
        xi = tl.load(ptr + rows_i[:, None] * s0 + cols[None, :] * s1, mask=mask_i[:, None] & cm, other=0.0)
        xj = tl.load(ptr + rows_j[:, None] * s0 + cols[None, :] * s1, mask=mask_j[:, None] & cm, other=0.0)
        if DOT_UPCAST:
            xi = xi.to(ACC)
            xj = xj.to(ACC)
        g = tl.dot(xi, tl.trans(xj), g, input_precision="ieee", out_dtype=ACC)
    return g


@triton.jit
def _delta_fro_kernel(
    tab_ptr,  # int64 [L, NF]
    off_ptr,  # int64 [K + 1] packed row offsets
    part_ptr,  # ACC [L, K, NT, NT]: per-tile partial sums of (A_k A_k^T) * (B_k B_k^T)
    NT,
    witness_ptr,
    NF: tl.constexpr,
    ACC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    k = pid // (NT * NT)
    t = pid % (NT * NT)
    ti = t // NT
    tj = t % NT
    ety = witness_ptr.dtype.element_ty
    base = tab_ptr + layer * NF
    o0 = tl.load(off_ptr + k)
    r = tl.load(off_ptr + k + 1) - o0
    ci = ti * BLOCK_T + tl.arange(0, BLOCK_T)
    cj = tj * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_i = ci < r
    mask_j = cj < r
    # the Grams are symmetric: tiles above the diagonal count twice, those below not at all;
    # tiles outside r_k x r_k (or below the diagonal) run no loop iterations (width 0)
    live = (ti <= tj) & (ti * BLOCK_T < r) & (tj * BLOCK_T < r)
    d_in = tl.where(live, tl.load(base + 2), 0)
    d_out = tl.where(live, tl.load(base + 3), 0)
    a_ptr = tl.load(base + 0).to(tl.pointer_type(ety))
    b_ptr = tl.load(base + 1).to(tl.pointer_type(ety))
    ga = _gram_tile(
        a_ptr,
        d_in,
        tl.load(base + 4),
        tl.load(base + 5),
        o0 + ci,
        mask_i,
        o0 + cj,
        mask_j,
        ACC,
        DOT_UPCAST,
        BLOCK_T,
        BLOCK_D,
    )
    gb = _gram_tile(
        b_ptr,
        d_out,
        tl.load(base + 6),
        tl.load(base + 7),
        o0 + ci,
        mask_i,
        o0 + cj,
        mask_j,
        ACC,
        DOT_UPCAST,
        BLOCK_T,
        BLOCK_D,
    )
    s = tl.sum(tl.sum(ga * gb, axis=1), axis=0)
    factor = tl.where(ti < tj, 2.0, 1.0).to(ACC)
    s = tl.where(live, s * factor, 0.0)
    tl.store(part_ptr + layer * tl.num_programs(0) + pid, s)


@triton.jit
def _aggregate_kernel(
    tab_ptr,  # int64 [2L, NF]: (src, dst, cols, src stride 0, src stride 1) per tensor
    rowptr_ptr,  # int64 [out_rank + 1]: output row j sums sources rowptr[j]:rowptr[j+1]
    src_ptr,  # int64 [R]: packed source rows, grouped by output row, clients in order
    w_ptr,  # ACC [R]: weight of each source (its client's weight)
    witness_ptr,
    NF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    ety = witness_ptr.dtype.element_ty
    base = tab_ptr + e * NF
    src = tl.load(base + 0).to(tl.pointer_type(ety))
    dst = tl.load(base + 1).to(tl.pointer_type(ety))
    d = tl.load(base + 2)
    s0 = tl.load(base + 3)
    s1 = tl.load(base + 4)
    lo = tl.load(rowptr_ptr + j)
    hi = tl.load(rowptr_ptr + j + 1)
    cols0 = tl.arange(0, BLOCK_D)
    sidx0 = tl.arange(0, BLOCK_S)
    for c0 in tl.range(0, d, BLOCK_D):
        cols = c0 + cols0
        cm = cols < d
        acc = tl.zeros([BLOCK_D], dtype=ACC)
        # fixed summation order (source chunks in order, a fixed-shape tree within a chunk): deterministic
        for s_lo in tl.range(lo, hi, BLOCK_S):
            sidx = s_lo + sidx0
            sm = sidx < hi
            rows = tl.load(src_ptr + sidx, mask=sm, other=0)
            w = tl.load(w_ptr + sidx, mask=sm, other=0.0)
            x = tl.load(src + rows[:, None] * s0 + cols[None, :] * s1, mask=sm[:, None] & cm[None, :], other=0.0)
            acc += tl.sum(x.to(ACC) * w[:, None], axis=0)
        tl.store(dst + j * d + cols, acc.to(ety), mask=cm)


@triton.jit
def _gather_rows_kernel(
    tab_ptr,  # int64 [2L, NF]
    idx_ptr,  # int64 [R_out]: source row of each output row
    R_out,
    witness_ptr,
    NF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    ety = witness_ptr.dtype.element_ty
    base = tab_ptr + e * NF
    src = tl.load(base + 0).to(tl.pointer_type(ety))
    dst = tl.load(base + 1).to(tl.pointer_type(ety))
    d = tl.load(base + 2)
    s0 = tl.load(base + 3)
    s1 = tl.load(base + 4)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R_out
    srows = tl.load(idx_ptr + rows, mask=rmask, other=0)
    cols0 = tl.arange(0, BLOCK_D)
    for c0 in tl.range(0, d, BLOCK_D):
        cols = c0 + cols0
        m = rmask[:, None] & (cols[None, :] < d)
        x = tl.load(src + srows[:, None] * s0 + cols[None, :] * s1, mask=m, other=0.0)
        tl.store(dst + rows[:, None] * d + cols[None, :], x, mask=m)


KERNELS = (_comp_norms_fwd_kernel, _comp_norms_bwd_kernel, _delta_fro_kernel, _aggregate_kernel, _gather_rows_kernel)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Every launch of this module goes through here (the tests count them).

    Triton launches on the *current* CUDA device, so the launch is pinned to the device of its
    first tensor argument (the table, on the layers' device).
    """
    dev = next(a.device for a in args if isinstance(a, torch.Tensor))
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            launch(kernel, grid)(*args, **kwargs)
    else:
        launch(kernel, grid)(*args, **kwargs)


def _host_only_interpreter(device: torch.device) -> bool:
    """Under ``TRITON_INTERPRET=1`` the kernels dereference table addresses on the host, so a
    CUDA tensor's address would be read as host memory: such calls go to the reference instead."""
    return INTERPRET and device.type != "cpu"


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


# GPU block shapes (the interpreter uses one wide tile instead: it pays per loop iteration)
GPU_BLOCK_R = 16  # rows per program of the row-wise kernels
GPU_BLOCK_D = 128  # columns per loop step: 512 B per fp32 row, full-width coalesced loads


def gpu_gram_block_d(dtype: torch.dtype) -> int:
    """Columns per step of the Gram tiles: fp64 64x64 tiles at 64 would take 128 KiB of shared memory."""
    return 32 if dtype == torch.float64 else 64


def gram_block_t(max_rank: int, interpret: bool = INTERPRET) -> int:
    """Gram tile edge.  On a GPU 16, tl.dot's least: a tile pair per program, ``ceil(r_k/16)``
    tiles a side, so an adapter of rank 4 computes a 16 x 16 tile, not r_max x r_max (the H200
    sweep, 64 x 64 tiles: 8.6 ms at 12 layers x 256 mixed ranks 4-64, d = 4096, slower than a
    zero-padded bmm's 6.0; with 16 x 16 tiles the products come to a fifth of those flops).
    The interpreter pays per program, so there one tile of up to 64 covers an adapter."""
    return min(_pow2(max_rank, 16), 64) if interpret else 16


def _block_d(max_d: int) -> int:
    return min(_pow2(max_d, 16), 1024) if INTERPRET else GPU_BLOCK_D


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """The int64 ``[n, F]`` pointer/size table of one launch, on the launch's device (one copy)."""
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def _dtype_groups(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Layer indices per dtype: one launch per dtype present (normally one)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


@functools.lru_cache(maxsize=256)
def _index_tables(ranks: tuple[int, ...], out_rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-layout index tables, built on the host once per (ranks, out_rank, device)."""
    K, r_max = len(ranks), max(ranks)
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    dest = [k * r_max + j for k, r in enumerate(ranks) for j in range(r)]
    comp = [j for r in ranks for j in range(r)]
    # aggregation CSR: output row j gathers row offsets[k] + j of every client with r_k > j
    rowptr, src, src_client = [0], [], []
    for j in range(out_rank):
        for k in range(K):
            if ranks[k] > j:
                src.append(offsets[k] + j)
                src_client.append(k)
        rowptr.append(len(src))
    max_sources = max(rowptr[j + 1] - rowptr[j] for j in range(out_rank)) if out_rank else 0

    def t(v):
        return to_device(torch.tensor(v, dtype=torch.int64), device)

    return {
        "offsets": t(offsets),
        "dest": t(dest),
        "comp": t(comp),
        "rowptr": t(rowptr),
        "src": t(src),
        "src_client": t(src_client),
        "max_sources": max_sources,
    }


def _norms_rows(As, Bs, dAs=None, dBs=None) -> list[list[int]]:
    rows = []
    for i, (a, b) in enumerate(zip(As, Bs)):
        da = dAs[i].data_ptr() if dAs is not None else 0
        db = dBs[i].data_ptr() if dBs is not None else 0
        rows.append([a.data_ptr(), b.data_ptr(), a.shape[1], b.shape[1], *a.stride(), *b.stride(), da, db])
    return rows


def _norms_blocks(R: int, max_d: int) -> tuple[int, int]:
    block_r = min(_pow2(R, 16), 64) if INTERPRET else GPU_BLOCK_R
    return block_r, _block_d(max_d)


class _ComponentNorms(torch.autograd.Function):
    """``[L, K, r_max]`` per-component norm products of L same-dtype layers; args ``(layout, L, *As, *Bs)``."""

    @staticmethod
    def forward(ctx, layout: AdapterLayout, L: int, *tensors: torch.Tensor) -> torch.Tensor:
        As, Bs = list(tensors[:L]), list(tensors[L:])
        dev, R = As[0].device, layout.total_rank
        acc_t, acc_tl = _acc(As[0].dtype)
        K, r_max = layout.num_adapters, layout.max_rank
        tabs = _index_tables(layout.ranks, layout.max_rank, dev)
        out = torch.zeros(L, K, r_max, dtype=acc_t, device=dev)
        na = torch.empty(L, R, dtype=acc_t, device=dev)
        nb = torch.empty(L, R, dtype=acc_t, device=dev)
        max_d = max(max(a.shape[1], b.shape[1]) for a, b in zip(As, Bs))
        block_r, block_d = _norms_blocks(R, max_d)
        tab = _table(_norms_rows(As, Bs), dev)
        _launch(
            _comp_norms_fwd_kernel, (triton.cdiv(R, block_r), L),
            tab, tabs["dest"], out, na, nb, R, K * r_max, As[0],
            NF=_NF_NORMS, ACC=acc_tl, BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
        ctx.layout, ctx.L, ctx.blocks = layout, L, (block_r, block_d)
        ctx.save_for_backward(na, nb, *tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: torch.Tensor):
        na, nb, *tensors = ctx.saved_tensors
        L, layout = ctx.L, ctx.layout
        As, Bs = tensors[:L], tensors[L:]
        if not any(ctx.needs_input_grad[2:]):
            return (None, None) + (None,) * (2 * L)
        dev, R = As[0].device, layout.total_rank
        acc_t, acc_tl = _acc(As[0].dtype)
        K, r_max = layout.num_adapters, layout.max_rank
        tabs = _index_tables(layout.ranks, layout.max_rank, dev)
        g = gout.to(acc_t).contiguous()
        dAs = [torch.empty(a.shape, dtype=a.dtype, device=dev) for a in As]
        dBs = [torch.empty(b.shape, dtype=b.dtype, device=dev) for b in Bs]
        block_r, block_d = ctx.blocks
        tab = _table(_norms_rows(As, Bs, dAs, dBs), dev)
        _launch(
            _comp_norms_bwd_kernel, (triton.cdiv(R, block_r), L),
            tab, tabs["dest"], g, na, nb, R, K * r_max, As[0],
            NF=_NF_NORMS, ACC=acc_tl, BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
        return (None, None, *dAs, *dBs)


def component_norms_impl(As: list, Bs: list, layout: AdapterLayout) -> torch.Tensor:
    """``[L, K, r_max]`` ``||a_kj|| * ||b_kj||`` per layer, 0 past ``r_k``; differentiable.

    Args:
        As: L tensors ``[R, d_in_l]``; Bs: L tensors ``[R, d_out_l]`` (validated, packed for
            ``layout``; fp32/fp16/bf16/fp64, any strides).
    Returns float32 (float64 for float64 inputs), one launch per dtype present.
    """
    if _host_only_interpreter(As[0].device):
        return reference.component_norms_impl(As, Bs, layout)
    groups = _dtype_groups(As)
    if len(groups) == 1:
        return _ComponentNorms.apply(layout, len(As), *As, *Bs)
    per_layer: list[torch.Tensor | None] = [None] * len(As)
    for idx in groups.values():
        res = _ComponentNorms.apply(layout, len(idx), *[As[i] for i in idx], *[Bs[i] for i in idx])
        for n, i in enumerate(idx):
            per_layer[i] = res[n]
    dt = torch.float64 if any(p.dtype == torch.float64 for p in per_layer) else torch.float32
    return torch.stack([p.to(dt) for p in per_layer])


def delta_fro_norms_impl(As: list, Bs: list, layout: AdapterLayout, scaling) -> torch.Tensor:
    """``[L, K]`` ``||s_k B_k^T A_k||_F`` per layer from Gram tiles; ``scaling`` a float or fp32 ``[K]``.

    Returns float32 (float64 for float64 inputs), one kernel launch per dtype present plus a
    torch reduction of the ``[L, K, NT, NT]`` per-tile partial sums (fixed order: deterministic).
    """
    dev = As[0].device
    if _host_only_interpreter(dev):
        return reference.delta_fro_norms_impl(As, Bs, layout, scaling)
    K = layout.num_adapters
    tabs = _index_tables(layout.ranks, layout.max_rank, dev)
    block_t = gram_block_t(layout.max_rank)
    nt = triton.cdiv(layout.max_rank, block_t)
    results: list[torch.Tensor | None] = [None] * len(As)
    for dtype, idx in _dtype_groups(As).items():
        acc_t, acc_tl = _acc(dtype)
        a_g, b_g = [As[i] for i in idx], [Bs[i] for i in idx]
        max_d = max(max(a.shape[1], b.shape[1]) for a, b in zip(a_g, b_g))
        block_d = min(_pow2(max_d, 16), 1024) if INTERPRET else gpu_gram_block_d(dtype)
        part = torch.empty(len(idx), K, nt, nt, dtype=acc_t, device=dev)
        tab = _table(_norms_rows(a_g, b_g), dev)
        # upcast tiles where the interpreter mishandles half maths, and for fp64 (dot in ACC)
        upcast = INTERPRET or dtype in (torch.float32, torch.float64)
        _launch(
            _delta_fro_kernel, (K * nt * nt, len(idx)),
            tab, tabs["offsets"], part, nt, a_g[0],
            NF=_NF_NORMS, ACC=acc_tl, DOT_UPCAST=upcast, BLOCK_T=block_t, BLOCK_D=block_d,
        )  # fmt: skip
        sq = part.sum(dim=(2, 3)).clamp_min(0).sqrt()
        for n, i in enumerate(idx):
            results[i] = sq[n]
    dt = torch.float64 if any(r.dtype == torch.float64 for r in results) else torch.float32
    norms = torch.stack([r.to(dt) for r in results])
    if isinstance(scaling, torch.Tensor):
        return norms * scaling.to(device=dev, dtype=dt).abs()
    return norms * abs(float(scaling))


def _copy_rows(As: list, Bs: list, outA: list, outB: list) -> list[list[int]]:
    rows = []
    for srcs, dsts in ((As, outA), (Bs, outB)):
        for s, d in zip(srcs, dsts):
            rows.append([s.data_ptr(), d.data_ptr(), s.shape[1], *s.stride()])
    return rows


def weighted_aggregate_impl(As: list, Bs: list, layout: AdapterLayout, weights: torch.Tensor, out_rank: int):
    """Per layer ``(sum_k w_k pad(A_k) [out_rank, d_in], sum_k w_k pad(B_k) [out_rank, d_out])``.

    Args:
        weights: float64 ``[K]`` (any finite reals).  out_rank: ``>= max r_k`` (validated).
    Returns two lists of L tensors in the inputs' dtype; accumulation in float32 (float64 for
    float64); rows past every adapter's rank are zero.  One launch per dtype for A and B of all
    layers; each output row sums its sources in client order (deterministic, no atomics).
    """
    dev = As[0].device
    if _host_only_interpreter(dev):
        return reference.weighted_aggregate_impl(As, Bs, layout, weights, out_rank)
    tabs = _index_tables(layout.ranks, out_rank, dev)
    outA = [torch.empty(out_rank, a.shape[1], dtype=a.dtype, device=dev) for a in As]
    outB = [torch.empty(out_rank, b.shape[1], dtype=b.dtype, device=dev) for b in Bs]
    if out_rank == 0:
        return outA, outB
    block_s = min(_pow2(tabs["max_sources"]), 64)
    for dtype, idx in _dtype_groups(As).items():
        acc_t, acc_tl = _acc(dtype)
        src_w = weights.to(device=dev, dtype=acc_t)[tabs["src_client"]]
        a_g, b_g = [As[i] for i in idx], [Bs[i] for i in idx]
        max_d = max(max(a.shape[1], b.shape[1]) for a, b in zip(a_g, b_g))
        block_d = _block_d(max_d)
        tab = _table(_copy_rows(a_g, b_g, [outA[i] for i in idx], [outB[i] for i in idx]), dev)
        _launch(
            _aggregate_kernel, (out_rank, 2 * len(idx)),
            tab, tabs["rowptr"], tabs["src"], src_w, a_g[0],
            NF=_NF_COPY, ACC=acc_tl, BLOCK_S=block_s, BLOCK_D=block_d,
        )  # fmt: skip
    return outA, outB


def truncate_impl(As: list, Bs: list, layout: AdapterLayout):
    """Per layer, rows ``0:r_k`` of the global ``A_g [r, d_in]``, ``B_g [r, d_out]`` for each adapter.

    Returns two lists of L packed tensors ``[R, d_in]``, ``[R, d_out]`` (input dtype), gathered
    in one launch per dtype for A and B of all layers.
    """
    dev = As[0].device
    if _host_only_interpreter(dev):
        return reference.truncate_impl(As, Bs, layout)
    R = layout.total_rank
    tabs = _index_tables(layout.ranks, layout.max_rank, dev)
    outA = [torch.empty(R, a.shape[1], dtype=a.dtype, device=dev) for a in As]
    outB = [torch.empty(R, b.shape[1], dtype=b.dtype, device=dev) for b in Bs]
    for _dtype, idx in _dtype_groups(As).items():
        a_g, b_g = [As[i] for i in idx], [Bs[i] for i in idx]
        max_d = max(max(a.shape[1], b.shape[1]) for a, b in zip(a_g, b_g))
        block_r = min(_pow2(R, 16), 64) if INTERPRET else GPU_BLOCK_R
        tab = _table(_copy_rows(a_g, b_g, [outA[i] for i in idx], [outB[i] for i in idx]), dev)
        _launch(
            _gather_rows_kernel, (triton.cdiv(R, block_r), 2 * len(idx)),
            tab, tabs["comp"], R, a_g[0],
            NF=_NF_COPY, BLOCK_R=block_r, BLOCK_D=_block_d(max_d),
        )  # fmt: skip
    return outA, outB


IMPLS = {
    "component_norms": component_norms_impl,
    "delta_fro_norms": delta_fro_norms_impl,
    "weighted_aggregate": weighted_aggregate_impl,
    "truncate": truncate_impl,
}
