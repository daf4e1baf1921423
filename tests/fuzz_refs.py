"""Float64 references for the fuzz tests, written from DESIGN.md section 2 with explicit loops.

Nothing here calls hetlora_kernels' ops or its ``reference`` module: every value comes from
the dense per-adapter ``ΔW_k = s_k B_k^T A_k`` (``[d_out, d_in]``), built adapter by adapter
and applied token by token.

Each reference also returns an *error scale* ("mag") next to its value: the same sum with
every term replaced by its absolute value, taken at the level where a correct kernel is
allowed to round (an intermediate ``h = x A_k^T`` kept in the input dtype, a rounded output).
A correct result must lie within ``tol * max(||ref||, FLOOR * ||mag||)`` of the value, so
that a result which cancels to almost nothing (one token, d_out = 1, terms of both signs) is
judged against the size of its terms instead of its tiny sum.  ``mag >= |ref|`` elementwise,
and for uncancelled sums the two are of the same size, so the floor only matters where the
relative error is ill-conditioned.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def scales_list(scaling, K: int) -> list[float]:
    """The K scalings as Python floats (float64), from a float, a list or a [K] tensor."""
    if isinstance(scaling, torch.Tensor):
        return [float(v) for v in scaling.to(F64).tolist()]
    if isinstance(scaling, (list, tuple)):
        return [float(v) for v in scaling]
    return [float(scaling)] * K


def offsets_of(ranks) -> list[int]:
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + int(r))
    return offs


def lora_ref(x, A, B, ranks, ids, scaling, dy, weight=None, bias=None) -> dict[str, torch.Tensor]:
    """float64 forward and gradients of ``y[t] = ΔW_{k(t)} x[t] (+ W x[t] + bias)``.

    Returns a dict with ``y, dx, dA, dB`` (and ``dW, db`` for the base layer) and the error
    scales ``y_mag, dx_mag, dA_mag, dB_mag`` (``dW_mag, db_mag``).  ``ids`` are Python ints,
    ``-1`` = no adapter.  Loss for the gradients: ``sum(y * dy)``.
    """
    K = len(ranks)
    s = scales_list(scaling, K)
    offs = offsets_of(ranks)
    x64, A64, B64, dy64 = (t.detach().to(F64) for t in (x, A, B, dy))
    T, d_in = x64.shape
    d_out = B64.shape[1]
    y = torch.zeros(T, d_out, dtype=F64)
    dx = torch.zeros(T, d_in, dtype=F64)
    dA = torch.zeros_like(A64)
    dB = torch.zeros_like(B64)
    y_mag, dx_mag = torch.zeros_like(y), torch.zeros_like(dx)
    dA_mag, dB_mag = torch.zeros_like(dA), torch.zeros_like(dB)
    for k in range(K):
        rows = slice(offs[k], offs[k + 1])
        Ak, Bk = A64[rows], B64[rows]  # [r, d_in], [r, d_out]
        dW = s[k] * Bk.t() @ Ak  # ΔW_k [d_out, d_in]
        G = torch.zeros(d_out, d_in, dtype=F64)  # dL/dΔW_k = sum_t dy[t] x[t]^T
        for t in range(T):
            if ids[t] != k:
                continue
            y[t] = dW @ x64[t]
            dx[t] = dW.t() @ dy64[t]
            G += torch.outer(dy64[t], x64[t])
            # error scales: intermediates h = A_k x, g = s_k B_k dy, each rounded once
            h = Ak @ x64[t]
            g = s[k] * (Bk @ dy64[t])
            y_mag[t] = abs(s[k]) * (h.abs() @ Bk.abs())
            dx_mag[t] = g.abs() @ Ak.abs()
            dA_mag[rows] += torch.outer(g.abs(), x64[t].abs())
            dB_mag[rows] += abs(s[k]) * torch.outer(h.abs(), dy64[t].abs())
        # ΔW_k = s_k B_k^T A_k:  dA_k = s_k B_k G,  dB_k = s_k A_k G^T
        dA[rows] = s[k] * Bk @ G
        dB[rows] = s[k] * Ak @ G.t()
    out = {"y": y, "dx": dx, "dA": dA, "dB": dB, "y_mag": y_mag, "dx_mag": dx_mag, "dA_mag": dA_mag, "dB_mag": dB_mag}
    if weight is not None:
        W64 = weight.detach().to(F64)
        for t in range(T):
            out["y"][t] += W64 @ x64[t]
            out["y_mag"][t] += W64.abs() @ x64[t].abs()
            out["dx"][t] += W64.t() @ dy64[t]
            out["dx_mag"][t] += W64.abs().t() @ dy64[t].abs()
        dW = torch.zeros_like(W64)
        dW_mag = torch.zeros_like(W64)
        for t in range(T):
            dW += torch.outer(dy64[t], x64[t])
            dW_mag += torch.outer(dy64[t].abs(), x64[t].abs())
        out["dW"], out["dW_mag"] = dW, dW_mag
        if bias is not None:
            b64 = bias.detach().to(F64)
            out["y"] += b64
            out["y_mag"] += b64.abs()
            out["db"] = dy64.sum(0)
            out["db_mag"] = dy64.abs().sum(0)
    return out


def component_norms_ref(A, B, ranks) -> torch.Tensor:
    """``[K, r_max]`` float64: ``||a_kj|| * ||b_kj||``, 0 past ``r_k``."""
    offs = offsets_of(ranks)
    A64, B64 = A.detach().to(F64), B.detach().to(F64)
    out = torch.zeros(len(ranks), max(ranks), dtype=F64)
    for k, r in enumerate(ranks):
        for j in range(r):
            row = offs[k] + j
            out[k, j] = torch.sqrt((A64[row] ** 2).sum()) * torch.sqrt((B64[row] ** 2).sum())
    return out


def component_norms_grad_ref(A, B, ranks, gout) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 gradients of ``sum(gout * component_norms)``: ``g ||b|| a / ||a||`` and ``g ||a|| b / ||b||``."""
    offs = offsets_of(ranks)
    A64, B64, g64 = A.detach().to(F64), B.detach().to(F64), gout.detach().to(F64)
    dA, dB = torch.zeros_like(A64), torch.zeros_like(B64)
    for k, r in enumerate(ranks):
        for j in range(r):
            row = offs[k] + j
            na, nb = A64[row].norm(), B64[row].norm()
            if na > 0:
                dA[row] = g64[k, j] * nb * A64[row] / na
            if nb > 0:
                dB[row] = g64[k, j] * na * B64[row] / nb
    return dA, dB


def delta_fro_sq_ref(A, B, ranks, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """``[K]`` float64 ``||ΔW_k||_F^2`` from the dense ``ΔW_k``, and its error scale.

    The scale is ``sum_ij |<a_i, a_j>| |<b_i, b_j>| s_k^2``, the size of the terms of the Gram
    identity the kernels use (DESIGN.md section 2), whose sum may cancel.
    """
    K = len(ranks)
    s = scales_list(1.0 if scaling is None else scaling, K)
    offs = offsets_of(ranks)
    A64, B64 = A.detach().to(F64), B.detach().to(F64)
    sq = torch.zeros(K, dtype=F64)
    mag = torch.zeros(K, dtype=F64)
    for k in range(K):
        Ak, Bk = A64[offs[k] : offs[k + 1]], B64[offs[k] : offs[k + 1]]
        dW = s[k] * Bk.t() @ Ak
        sq[k] = (dW * dW).sum()
        mag[k] = s[k] ** 2 * ((Ak @ Ak.t()).abs() * (Bk @ Bk.t()).abs()).sum()
    return sq, mag


def aggregate_ref(T, ranks, weights, out_rank) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k w_k pad(T_k)`` to ``out_rank`` rows, float64, and its error scale ``sum |w_k| |pad(T_k)|``."""
    offs = offsets_of(ranks)
    T64 = T.detach().to(F64)
    w = [float(v) for v in weights]
    out = torch.zeros(out_rank, T64.shape[1], dtype=F64)
    mag = torch.zeros_like(out)
    for k, r in enumerate(ranks):
        for j in range(r):
            out[j] += w[k] * T64[offs[k] + j]
            mag[j] += abs(w[k]) * T64[offs[k] + j].abs()
    return out, mag


def truncate_ref(G, ranks) -> torch.Tensor:
    """Rows ``0:r_k`` of ``G`` for every adapter, packed (an exact copy in G's dtype)."""
    return torch.cat([G[:r] for r in ranks]) if ranks else G[:0]


def dense_update(A, B, ranks, weights, scaling) -> torch.Tensor:
    """``M = sum_k p_k s_k B_k^T A_k`` as a dense float64 ``[d_out, d_in]`` matrix."""
    K = len(ranks)
    s = scales_list(1.0 if scaling is None else scaling, K)
    offs = offsets_of(ranks)
    A64, B64 = A.detach().to(F64), B.detach().to(F64)
    M = torch.zeros(B64.shape[1], A64.shape[1], dtype=F64)
    for k in range(K):
        rows = slice(offs[k], offs[k + 1])
        M += float(weights[k]) * s[k] * B64[rows].t() @ A64[rows]
    return M


def rel_to(got: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | None, floor: float) -> float:
    """``||got - ref|| / max(||ref||, floor * ||mag||)`` in float64 (0 when both are 0 and equal)."""
    got64 = got.detach().to(F64)
    num = (got64 - ref).norm().item()
    den = ref.norm().item()
    if mag is not None:
        den = max(den, floor * mag.norm().item())
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den
