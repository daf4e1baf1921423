"""Pure-PyTorch mixed-rank LoRA ops: the ``torch`` backend and the tests' oracle.

Every op groups tokens once per batch (the `TokenGroups` sort) and then runs one
matmul pair per adapter on contiguous slices: no per-token Python, no padding to
``r_max``.  ``lora_delta`` has a hand-written backward (DESIGN.md section 2):

    h = x A_k^T            y = s_k h B_k
    g = s_k dy B_k^T       dx = g A_k       dA_k = g^T x       dB_k = s_k h^T dy

The public functions validate their arguments; the ``*_impl`` functions take
validated arguments and are what the dispatcher registers as the torch backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import checks
from .layout import AdapterLayout, TokenGroups

__all__ = [
    "lora_delta",
    "lora_linear",
    "component_norms",
    "delta_fro_norms",
    "weighted_aggregate",
    "truncate",
]


def _scales(scaling: float | torch.Tensor, K: int) -> list[float]:
    if isinstance(scaling, torch.Tensor):
        host = checks.host_values(scaling)  # a layer's list: no read-back from the device
        return list(host) if host is not None else [float(s) for s in scaling.tolist()]
    return [float(scaling)] * K


def _forward_runs(x, A, B, layout: AdapterLayout, groups: TokenGroups, scales: list[float]):
    """``(y [T, d_out], hs)``: hs[k] = ``x_k A_k^T`` (x's dtype) per adapter, None where idle."""
    T, d_out = x.shape[0], B.shape[1]
    base = groups.starts_list[0]
    order = groups.routed_order()
    direct = groups.is_sorted  # tokens already grouped and none is -1: no gather/scatter
    xs = x if direct else x.index_select(0, order)
    ys = torch.empty(groups.num_routed, d_out, dtype=x.dtype, device=x.device)
    hs: list[torch.Tensor | None] = []
    for k in range(layout.num_adapters):
        t0 = groups.starts_list[k] - base
        t1 = t0 + groups.counts_list[k]
        if t1 == t0:
            hs.append(None)
            continue
        rows = slice(layout.offsets[k], layout.offsets[k + 1])
        h = xs[t0:t1] @ A[rows].t()
        torch.matmul(h * scales[k], B[rows], out=ys[t0:t1])
        hs.append(h)
    if direct:
        return ys, hs
    y = torch.zeros(T, d_out, dtype=x.dtype, device=x.device)
    y.index_copy_(0, order, ys)
    return y, hs


def _backward_runs(dy, x, A, B, hs, layout: AdapterLayout, groups: TokenGroups, scales: list[float], needs):
    """``(dx, dA, dB)`` (None where ``needs`` says so) from the forward's per-adapter ``hs``."""
    need_x, need_A, need_B = needs
    base = groups.starts_list[0]
    order = groups.routed_order()
    direct = groups.is_sorted
    dys = dy if direct else dy.index_select(0, order)
    xs = None
    if need_A:
        xs = x if direct else x.index_select(0, order)
    dxs = torch.empty(groups.num_routed, x.shape[1], dtype=x.dtype, device=x.device) if need_x else None
    dA = torch.zeros_like(A) if need_A else None
    dB = torch.zeros_like(B) if need_B else None
    for k in range(layout.num_adapters):
        t0 = groups.starts_list[k] - base
        t1 = t0 + groups.counts_list[k]
        if t1 == t0:
            continue
        rows = slice(layout.offsets[k], layout.offsets[k + 1])
        dy_k = dys[t0:t1]
        if need_x or need_A:
            g = (dy_k @ B[rows].t()) * scales[k]
            if need_x:
                torch.matmul(g, A[rows], out=dxs[t0:t1])
            if need_A:
                torch.matmul(g.t(), xs[t0:t1], out=dA[rows])
        if need_B:
            torch.matmul((hs[k] * scales[k]).t(), dy_k, out=dB[rows])
    dx = None
    if need_x:
        if direct:
            dx = dxs
        else:
            dx = torch.zeros_like(x)
            dx.index_copy_(0, order, dxs)
    return dx, dA, dB


class _LoraDelta(torch.autograd.Function):
    """``y[t] = s_k (x[t] A_k^T) B_k`` with the backward of DESIGN.md section 2."""

    @staticmethod
    def forward(ctx, x, A, B, layout: AdapterLayout, groups: TokenGroups, scales: list[float]):
        y, hs = _forward_runs(x, A, B, layout, groups, scales)
        ctx.layout, ctx.groups, ctx.scales = layout, groups, scales
        ctx.save_for_backward(x, A, B, *hs)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # (its matmuls write into slices: not differentiable)
    def backward(ctx, dy):
        x, A, B, *hs = ctx.saved_tensors
        dx, dA, dB = _backward_runs(dy, x, A, B, hs, ctx.layout, ctx.groups, ctx.scales, ctx.needs_input_grad[:3])
        return dx, dA, dB, None, None, None


def lora_forward(x, A, B, layout: AdapterLayout, groups: TokenGroups, scaling):
    """The forward alone (`hetlora_kernels.custom_ops`): ``(y [T, d_out], h)``, h the
    ``[T, r_max]`` accumulation-dtype tensor of ``x_k A_k^T`` by position in ``groups.order``
    that every backend's `lora_backward` reads (rows of ``-1`` tokens and columns past ``r_k``
    zero here)."""
    y, hs = _forward_runs(x, A, B, layout, groups, _scales(scaling, layout.num_adapters))
    h = torch.zeros(x.shape[0], layout.max_rank, dtype=_acc_dtype(x), device=x.device)
    for k, hk in enumerate(hs):
        if hk is not None:
            p0 = groups.starts_list[k]
            h[p0: p0 + hk.shape[0], : hk.shape[1]] = hk
    return y, h


def lora_backward(dy, x, A, B, h, layout: AdapterLayout, groups: TokenGroups, scaling, needs):
    """The backward alone: ``(dx, dA, dB)`` from `lora_forward`'s (any backend's) ``h``."""
    hs = []
    for k in range(layout.num_adapters):
        p0, n = groups.starts_list[k], groups.counts_list[k]
        # h holds x's values exactly when this path made it (x's dtype widened), so this is
        # bitwise the eager backward
        hs.append(h[p0: p0 + n, : layout.ranks[k]].to(x.dtype) if n else None)
    return _backward_runs(dy, x, A, B, hs, layout, groups, _scales(scaling, layout.num_adapters), needs)


# ---------------------------------------------------------------------------------------------
# implementations (validated arguments); registered as the torch backend
# ---------------------------------------------------------------------------------------------
def lora_delta_impl(x, A, B, layout, groups, scaling):
    return _LoraDelta.apply(x, A, B, layout, groups, _scales(scaling, layout.num_adapters))


def lora_linear_impl(x, weight, bias, A, B, layout, groups, scaling):
    return torch.nn.functional.linear(x, weight, bias) + lora_delta_impl(x, A, B, layout, groups, scaling)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def component_norms_impl(As: list, Bs: list, layout: AdapterLayout) -> torch.Tensor:
    """``[L, K, r_max]``: ``||a_kj|| * ||b_kj||`` per layer, zero past ``r_k``."""
    out = []
    for A, B in zip(As, Bs):
        acc = _acc_dtype(A)
        prod = torch.linalg.vector_norm(A.to(acc), dim=1) * torch.linalg.vector_norm(B.to(acc), dim=1)
        n = prod.new_zeros(layout.num_adapters, layout.max_rank)
        idx = (layout.row_adapter(A.device), layout.row_component(A.device))
        out.append(n.index_put(idx, prod))
    return torch.stack(out)


def delta_fro_norms_impl(As: list, Bs: list, layout: AdapterLayout, scaling) -> torch.Tensor:
    """``[L, K]``: ``|s_k| * sqrt(sum((A_k A_k^T) * (B_k B_k^T)))``, no ``d_out x d_in`` matrix.

    The adapters of one rank form one batched matmul per factor (`AdapterLayout.rank_classes`):
    a handful of torch ops per layer and distinct rank, not three per adapter (on an H200, 256
    adapters over 12 layers took 176 ms one adapter at a time).
    """
    scales = _scales(scaling, layout.num_adapters)
    out = []
    for A, B in zip(As, Bs):
        acc = _acc_dtype(A)
        Aa, Ba = A.to(acc), B.to(acc)
        sq = Aa.new_empty(layout.num_adapters)
        for r, ks, rows in layout.rank_classes(A.device):
            a = Aa.index_select(0, rows).view(len(ks), r, -1)
            b = Ba.index_select(0, rows).view(len(ks), r, -1)
            sq.index_copy_(0, ks, (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2)))
        norms = sq.clamp_min(0).sqrt()
        out.append(norms * torch.tensor(scales, dtype=acc, device=A.device).abs())
    return torch.stack(out)


def weighted_aggregate_impl(As: list, Bs: list, layout: AdapterLayout, weights: torch.Tensor, out_rank: int):
    """Per layer ``(sum_k w_k pad(A_k), sum_k w_k pad(B_k))`` padded to ``out_rank`` rows."""
    outA, outB = [], []
    for A, B in zip(As, Bs):
        idx = layout.row_component(A.device)
        acc = _acc_dtype(A)
        w_rows = weights.to(acc)[layout.row_adapter(A.device)].unsqueeze(1)
        res = []
        for t in (A, B):
            g = torch.zeros(out_rank, t.shape[1], dtype=acc, device=t.device)
            g.index_add_(0, idx, t.to(acc) * w_rows)
            res.append(g.to(t.dtype))
        outA.append(res[0])
        outB.append(res[1])
    return outA, outB


def truncate_impl(As: list, Bs: list, layout: AdapterLayout):
    """Per layer, rows ``0:r_k`` of the global factors for every adapter k, packed."""
    outA, outB = [], []
    for A, B in zip(As, Bs):
        idx = layout.row_component(A.device)
        outA.append(A.index_select(0, idx))
        outB.append(B.index_select(0, idx))
    return outA, outB


IMPLS = {
    "lora_delta": lora_delta_impl,
    "lora_linear": lora_linear_impl,
    "component_norms": component_norms_impl,
    "delta_fro_norms": delta_fro_norms_impl,
    "weighted_aggregate": weighted_aggregate_impl,
    "truncate": truncate_impl,
}


# ---------------------------------------------------------------------------------------------
# validation shared by every backend, and the public wrappers
# ---------------------------------------------------------------------------------------------
def prepare_lora_delta(x, A, B, layout, groups, scaling):
    return (x, A, B, layout, groups, checks.check_lora_inputs(x, A, B, layout, groups, scaling))


def prepare_lora_linear(x, weight, bias, A, B, layout, groups, scaling):
    s = checks.check_lora_inputs(x, A, B, layout, groups, scaling)
    checks.check_base(x, weight, bias, B.shape[1])
    return (x, weight, bias, A, B, layout, groups, s)


def _prepare_layers(A, B, layout, a_name="A", b_name="B"):
    checks.check_layout(layout)
    As, Bs, was_list = checks.as_layer_lists(A, B, a_name, b_name)
    for i, (a, b) in enumerate(zip(As, Bs)):
        an, bn = (f"{a_name}[{i}]", f"{b_name}[{i}]") if was_list else (a_name, b_name)
        checks.check_factors(a, b, layout, an, bn)
        if a.device != As[0].device:
            raise ValueError(f"{an} is on {a.device} but {a_name}[0] is on {As[0].device}")
    return As, Bs, was_list


def prepare_component_norms(A, B, layout, reduce="none"):
    if reduce not in ("none", "sum"):
        raise ValueError(f"reduce must be 'none' or 'sum', got {reduce!r}")
    As, Bs, was_list = _prepare_layers(A, B, layout)
    return (As, Bs, layout), (was_list, reduce)


def finish_component_norms(res: torch.Tensor, extra):
    was_list, reduce = extra
    if reduce == "sum":
        return res.sum(0)
    return res if was_list else res[0]


def prepare_delta_fro_norms(A, B, layout, scaling=None):
    As, Bs, was_list = _prepare_layers(A, B, layout)
    s = 1.0 if scaling is None else checks.check_scaling(scaling, layout.num_adapters, As[0].device)
    return (As, Bs, layout, s), was_list


def finish_delta_fro_norms(res: torch.Tensor, was_list):
    return res if was_list else res[0]


def prepare_weighted_aggregate(A, B, layout, weights, out_rank=None):
    As, Bs, was_list = _prepare_layers(A, B, layout)
    w = checks.check_weights(weights, layout.num_adapters, As[0].device)
    if out_rank is None:
        out_rank = layout.max_rank
    out_rank = checks.as_int(out_rank, "out_rank")
    if out_rank < layout.max_rank:
        k = layout.ranks.index(layout.max_rank)
        raise ValueError(
            f"out_rank={out_rank} is smaller than adapter {k}'s rank {layout.max_rank}: zero-padding cannot shrink"
        )
    for i, (a, b) in enumerate(zip(As, Bs)):
        suffix = f"[{i}]" if was_list else ""
        checks.check_finite_per_adapter(a, layout, "A" + suffix)
        checks.check_finite_per_adapter(b, layout, "B" + suffix)
    return (As, Bs, layout, w, out_rank), was_list


def finish_pair(res, was_list):
    outA, outB = res
    return (outA, outB) if was_list else (outA[0], outB[0])


def prepare_truncate(A_g, B_g, ranks):
    layout = AdapterLayout(ranks)
    As, Bs, was_list = checks.as_layer_lists(A_g, B_g, "A_g", "B_g")
    for i, (a, b) in enumerate(zip(As, Bs)):
        an, bn = (f"A_g[{i}]", f"B_g[{i}]") if was_list else ("A_g", "B_g")
        checks.check_tensor(a, an, 2)
        checks.check_tensor(b, bn, 2)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{an} has {a.shape[0]} rows but {bn} has {b.shape[0]}")
        if a.dtype != b.dtype:
            raise TypeError(f"{bn} dtype {b.dtype} differs from {an} dtype {a.dtype}")
        if a.device != b.device:
            raise ValueError(f"{bn} is on {b.device} but {an} is on {a.device}")
        if a.device != As[0].device:  # one launch serves every layer: their pointers must be on one device
            raise ValueError(f"{an} is on {a.device} but A_g[0] is on {As[0].device}")
        if layout.max_rank > a.shape[0]:
            raise ValueError(f"ranks ask for rank {layout.max_rank} but {an} holds only {a.shape[0]} components")
    return (As, Bs, layout), was_list


def finish_truncate(res, was_list, layout):
    outA, outB = res
    return (outA, outB, layout) if was_list else (outA[0], outB[0], layout)


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """Mixed-rank LoRA delta ``[T, d_out]``: ``y[t] = s_k (x[t] A_k^T) B_k``, 0 where id is -1.

    Args:
        x: ``[T, d_in]`` float32/float16/bfloat16/float64.
        A: ``[R, d_in]``, B: ``[R, d_out]`` packed for ``layout``, same dtype as x.
        groups: token grouping of this batch (``groups.num_tokens == T``).
        scaling: float, or ``[K]`` tensor (one per adapter; not differentiated).
    Differentiable in x, A and B.
    """
    return lora_delta_impl(*prepare_lora_delta(x, A, B, layout, groups, scaling))


def lora_linear(x, weight, bias, A, B, layout, groups, scaling) -> torch.Tensor:
    """``x W^T + bias + lora_delta(...)``; weight ``[d_out, d_in]``, bias ``[d_out]`` or None."""
    return lora_linear_impl(*prepare_lora_linear(x, weight, bias, A, B, layout, groups, scaling))


def component_norms(A, B, layout: AdapterLayout, reduce: str = "none") -> torch.Tensor:
    """``[K, r_max]`` (``[L, K, r_max]`` for lists, summed over layers with ``reduce="sum"``)."""
    args, extra = prepare_component_norms(A, B, layout, reduce)
    return finish_component_norms(component_norms_impl(*args), extra)


def delta_fro_norms(A, B, layout: AdapterLayout, scaling=None) -> torch.Tensor:
    """``[K]`` ``||s_k B_k^T A_k||_F`` (``[L, K]`` for lists) by the Gram identity."""
    args, was_list = prepare_delta_fro_norms(A, B, layout, scaling)
    return finish_delta_fro_norms(delta_fro_norms_impl(*args), was_list)


def weighted_aggregate(A, B, layout: AdapterLayout, weights, out_rank: int | None = None):
    """``(A_g [out_rank, d_in], B_g [out_rank, d_out]) = sum_k w_k pad(A_k), sum_k w_k pad(B_k)``."""
    args, was_list = prepare_weighted_aggregate(A, B, layout, weights, out_rank)
    return finish_pair(weighted_aggregate_impl(*args), was_list)


def truncate(A_g, B_g, ranks: Sequence[int] | AdapterLayout):
    """Rows ``0:r_k`` of the global ``A_g [r, d_in]``, ``B_g [r, d_out]`` for each rank, packed."""
    args, was_list = prepare_truncate(A_g, B_g, ranks)
    return finish_truncate(truncate_impl(*args), was_list, args[2])
