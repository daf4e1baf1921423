"""Server-side low-rank algebra on packed factors, for the FlexLoRA and FLoRA baselines.

Torch-level and backend-independent; no ``d_out x d_in`` matrix is ever formed.

Conventions (DESIGN.md section 2): client k's packed rows ``A_k [r_k, d_in]``, ``B_k [r_k, d_out]``
give ``ΔW_k = s_k B_k^T A_k``.  The global update that both baselines start from is

    M = sum_k p_k s_k B_k^T A_k = Bs^T As,   As = A (all R rows),   Bs = rows of B times p_k s_k,

an ``R``-term sum of rank-one products (``R = sum r_k``).

- `flora_stack` (FLoRA, Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models
  with Heterogeneous Low-Rank Adaptations"): stacking *is* the packed layout; the weight and the
  scaling go on the B rows, so ``B_s^T A_s = M``.
- `lowrank_svd_redistribute` (FlexLoRA, Bai et al., 2024, "Federated Fine-tuning of Large
  Language Models under Heterogeneous Tasks and Client Resources"): the SVD of M from thin QRs of
  the stacked factors, ``O(R^2 (d_in + d_out))``, then each client receives M's best rank-``r_k``
  approximation (Eckart-Young).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import checks
from .layout import AdapterLayout

__all__ = ["flora_stack", "lowrank_svd_redistribute", "stacked_svd"]


def _prepare(A, B, layout, weights, scaling):
    """Validate; returns (As, Bs, was_list, weights fp64 [K], scaling float | fp32 [K])."""
    checks.check_layout(layout)
    As, Bs, was_list = checks.as_layer_lists(A, B)
    for i, (a, b) in enumerate(zip(As, Bs)):
        suffix = f"[{i}]" if was_list else ""
        checks.check_factors(a, b, layout, "A" + suffix, "B" + suffix)
        if a.device != As[0].device:
            raise ValueError(f"A{suffix} is on {a.device} but A[0] is on {As[0].device}")
        # a NaN/Inf anywhere would spread through the QR to every client: name the culprit
        checks.check_finite_per_adapter(a, layout, "A" + suffix)
        checks.check_finite_per_adapter(b, layout, "B" + suffix)
    dev = As[0].device
    w = checks.check_weights(weights, layout.num_adapters, dev)
    s = 1.0 if scaling is None else checks.check_scaling(scaling, layout.num_adapters, dev)
    return As, Bs, was_list, w, s


def _row_coef(layout: AdapterLayout, w: torch.Tensor, s, dtype: torch.dtype) -> torch.Tensor:
    """``[R]``: ``p_k s_k`` of each packed row's client, in ``dtype``."""
    ws = w.to(dtype) * (s.to(device=w.device, dtype=dtype) if isinstance(s, torch.Tensor) else float(s))
    return ws[layout.row_adapter(w.device)]


def flora_stack(A, B, layout: AdapterLayout, weights, scaling=None, *, out_scaling: float = 1.0):
    """FLoRA stacking as a layout operation: ``B_s^T A_s = sum_k p_k s_k B_k^T A_k / out_scaling``.

    Args:
        A: ``[R, d_in]``, B: ``[R, d_out]`` packed for ``layout`` (or lists of per-layer tensors,
            widths free); fp32/fp16/bf16/fp64.
        weights: ``[K]`` aggregation weights ``p_k`` (any finite reals).
        scaling: the senders' ``s_k``: None (1), a float or ``[K]``.
        out_scaling: the scaling the receivers apply to the stacked adapter (e.g. ``alpha / R``
            for a rank-R LoRA); it is divided out of B so that ``out_scaling * B_s^T A_s = M``.
    Returns ``(A_s [R, d_in], B_s [R, d_out])`` in the input dtype (lists for list inputs), to be
    used with ``layout``'s total rank R as one rank-R adapter.  ``A_s`` is a copy of ``A``; the
    factor ``p_k s_k / out_scaling`` goes on B's rows (computed in float32, float64 for float64,
    then rounded once to the input dtype), so the product is exact up to that rounding.
    Raises ``ValueError`` naming the client whose rows are not finite.
    """
    As, Bs, was_list, w, s = _prepare(A, B, layout, weights, scaling)
    if isinstance(out_scaling, bool) or not isinstance(out_scaling, numbers.Real) or not math.isfinite(out_scaling):
        raise TypeError(f"out_scaling must be a finite float, got {out_scaling!r}")
    if out_scaling == 0:
        raise ValueError("out_scaling must be non-zero (it is divided out of B)")
    outA, outB = [], []
    for a, b in zip(As, Bs):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        coef = _row_coef(layout, w, s, acc) / float(out_scaling)
        outA.append(a.clone())
        outB.append((b.to(acc) * coef[:, None]).to(b.dtype))
    return (outA, outB) if was_list else (outA[0], outB[0])


def stacked_svd(A: torch.Tensor, B: torch.Tensor, coef: torch.Tensor, dtype: torch.dtype = torch.float64):
    """SVD of ``M = sum_i coef_i b_i a_i^T`` (``[d_out, d_in]``) without forming M.

    Args:
        A: ``[R, d_in]``, B: ``[R, d_out]``; coef: ``[R]`` per-row factor.  dtype: compute dtype.
    Returns ``(U [d_out, q], S [q], Vh [q, d_in])`` with ``M = U diag(S) Vh``,
    ``q = min(R, d_in, d_out)``, S descending.  Thin QRs ``(coef B)^T = Q_b R_b``,
    ``A^T = Q_a R_a``, then the SVD of the small core ``R_b R_a^T``: ``O(R^2 (d_in + d_out))``.
    """
    Bs = B.to(dtype) * coef.to(dtype)[:, None]
    Qb, Rb = torch.linalg.qr(Bs.t())  # [d_out, qb], [qb, R]
    Qa, Ra = torch.linalg.qr(A.to(dtype).t())  # [d_in, qa], [qa, R]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.t(), full_matrices=False)  # [qb, q], [q], [q, qa]
    return Qb @ U, S, Vh @ Qa.t()


def _receiver_scaling(out_scaling, scaling, n_out: int, K: int, device) -> torch.Tensor:
    """The receivers' scalings as a float64 ``[K']`` tensor (non-zero, finite)."""
    if out_scaling is None:
        scalar = isinstance(scaling, torch.Tensor) and scaling.dim() == 0
        if scaling is None or scalar or not isinstance(scaling, (torch.Tensor, Sequence)):
            out_scaling = 1.0 if scaling is None else scaling
        elif n_out == K:
            out_scaling = scaling
        else:
            raise ValueError(
                f"scaling has one value per sender (K={K}) but ranks names {n_out} receivers: pass out_scaling"
            )
    s = checks.check_scaling(out_scaling, n_out, device)
    s = s.to(torch.float64) if isinstance(s, torch.Tensor) else torch.full((n_out,), s, dtype=torch.float64)
    s = s.to(device)
    if bool((s == 0).any()):
        k = int((s == 0).nonzero()[0, 0])
        raise ValueError(f"out_scaling of receiver {k} is 0: a client's scaling cannot be divided out")
    return s


def lowrank_svd_redistribute(
    A,
    B,
    layout: AdapterLayout,
    weights,
    ranks: Sequence[int] | AdapterLayout,
    scaling=None,
    *,
    out_scaling=None,
    compute_dtype: torch.dtype = torch.float64,
):
    """FlexLoRA redistribution: each receiver gets the best rank-``r'_k`` approximation of M.

    ``M = sum_k p_k s_k B_k^T A_k`` (``[d_out, d_in]``, never formed) is factored by `stacked_svd`
    as ``U diag(S) Vh``.  Receiver k (rank ``r'_k`` = ``ranks[k]``, scaling ``s'_k``) gets

        A'_k = diag(sqrt(S_:r / |s'_k|)) Vh[:r]         [r'_k, d_in]
        B'_k = sign(s'_k) diag(sqrt(S_:r / |s'_k|)) U[:, :r]^T    [r'_k, d_out]

    i.e. the singular values split as ``sqrt(S)`` on each side and the receiver's own scaling
    divided out evenly, so that ``s'_k B'_k^T A'_k = U_r diag(S_r) Vh_r``, M's best rank-``r'_k``
    approximation (Frobenius error ``sqrt(sum_{i>r} S_i^2)``).  Where ``r'_k`` exceeds
    ``q = min(R, d_in, d_out)`` (M's rank is at most q) the extra rows are zero.

    Args:
        A: ``[R, d_in]``, B: ``[R, d_out]`` packed for ``layout`` (the senders), or lists of
            per-layer tensors (widths free): every layer is treated alike.
        weights: ``[K]`` finite weights ``p_k``.  ranks: the receivers' ranks ``r'`` (K' ints in
            ``[1, R]``, or an AdapterLayout).
        scaling: the senders' ``s_k`` (None = 1, a float or ``[K]``).
        out_scaling: the receivers' ``s'_k`` (float or ``[K']``, non-zero); default ``scaling``
            when that is a float or K' == K, else required.
        compute_dtype: dtype of the QR/SVD (float64 by default: the cost is ``O(R^2 d)``).
    Returns ``(A' [R', d_in], B' [R', d_out], AdapterLayout(ranks))`` in the input dtype
    (lists of A' and B' for list inputs).
    Raises ``ValueError`` for a rank above R, a non-finite client (named) or a zero out_scaling.
    """
    As, Bs, was_list, w, s = _prepare(A, B, layout, weights, scaling)
    new_layout = AdapterLayout(ranks)
    R = layout.total_rank
    for k, r in enumerate(new_layout.ranks):
        if r > R:
            raise ValueError(f"ranks[{k}] = {r} exceeds the senders' total rank R={R}: M has rank at most {R}")
    dev = As[0].device
    s_out = _receiver_scaling(out_scaling, scaling, new_layout.num_adapters, layout.num_adapters, dev)
    comp = new_layout.row_component(dev)  # component index j of each new row
    recv = new_layout.row_adapter(dev)  # receiver of each new row
    outA, outB = [], []
    for a, b in zip(As, Bs):
        U, S, Vh = stacked_svd(a, b, _row_coef(layout, w, s, compute_dtype), compute_dtype)
        q = S.shape[0]
        if q == 0:  # a zero-width layer: M is empty, so are the factors
            outA.append(a.new_zeros(new_layout.total_rank, a.shape[1]))
            outB.append(b.new_zeros(new_layout.total_rank, b.shape[1]))
            continue
        sq = S.clamp_min(0).sqrt()
        # row j of receiver k: sqrt(S_j / |s'_k|) * (Vh[j], sign(s'_k) U[:, j]); 0 for j >= q
        valid = comp < q
        jj = comp.clamp_max(q - 1)
        f = torch.where(valid, sq[jj], torch.zeros((), dtype=compute_dtype, device=dev))
        f = f / s_out.to(compute_dtype)[recv].abs().sqrt()
        sign = torch.sign(s_out.to(compute_dtype))[recv]
        outA.append((Vh[jj] * f[:, None]).to(a.dtype))
        outB.append((U.t()[jj] * (f * sign)[:, None]).to(b.dtype))
    return (outA, outB, new_layout) if was_list else (outA[0], outB[0], new_layout)
