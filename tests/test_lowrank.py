"""FlexLoRA SVD redistribution and FLoRA stacking on packed factors vs dense float64 algebra."""

from __future__ import annotations

import pytest
import torch

from hetlora_kernels import AdapterLayout
from hetlora_kernels.lowrank import flora_stack, lowrank_svd_redistribute, stacked_svd

from .helpers import rel_err

SENDERS = [2, 5, 1, 4]  # R = 12


def make(ranks, d_in, d_out, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    return torch.randn(R, d_in, generator=g).to(dtype), torch.randn(R, d_out, generator=g).to(dtype)


def dense_M(A, B, layout, w, s):
    """float64 ``sum_k w_k s_k B_k^T A_k``, dense ``[d_out, d_in]``."""
    A, B = A.double(), B.double()
    M = torch.zeros(B.shape[1], A.shape[1], dtype=torch.float64)
    for k in range(layout.num_adapters):
        rows = layout.rows(k)
        M += float(w[k]) * float(s[k]) * B[rows].t() @ A[rows]
    return M


def client_product(A, B, layout, k, s_k):
    rows = layout.rows(k)
    return s_k * B[rows].double().t() @ A[rows].double()


W = torch.tensor([0.1, 0.4, -0.2, 0.7], dtype=torch.float64)
S = [2.0, 1.0, 0.5, -1.0]


@pytest.mark.parametrize("shape", [(16, 10), (9, 30), (6, 8)])  # (d_in, d_out); the last has d < R
def test_redistribute_is_best_rank_r_approximation(shape):
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, *shape, seed=1)
    M = dense_M(A, B, layout, W, S)
    sv = torch.linalg.svdvals(M)
    ranks = [1, 3, 12, 5, 7]  # receivers: rank 1, rank R (exact), ranks above min(d) pad with zeros
    out_s = [1.0, 0.5, 2.0, -3.0, 1.0]
    An, Bn, new = lowrank_svd_redistribute(A, B, layout, W, ranks, torch.tensor(S), out_scaling=out_s)
    assert new == AdapterLayout(ranks) and An.shape == (sum(ranks), shape[0]) and Bn.shape == (sum(ranks), shape[1])
    for k, r in enumerate(ranks):
        Mk = client_product(An, Bn, new, k, out_s[k])
        tail = sv[r:].norm().item()  # Eckart-Young: the error is exactly the tail
        err = (M - Mk).norm().item()
        assert abs(err - tail) <= 1e-9 * max(1.0, M.norm().item())
        # and the rank-r singular values are the top r of M
        top = torch.linalg.svdvals(Mk)[: min(r, sv.numel())]
        torch.testing.assert_close(top, sv[: top.numel()], rtol=1e-9, atol=1e-9)


def test_redistribute_split_is_symmetric():
    """Singular values split as sqrt on each side: A'_k and B'_k rows have equal norms."""
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 14, 11, seed=2)
    An, Bn, new = lowrank_svd_redistribute(A, B, layout, W, [4], 1.0)
    torch.testing.assert_close(An.norm(dim=1), Bn.norm(dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_redistribute_low_precision_inputs(dtype, tol):
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 20, 13, dtype, seed=3)
    M = dense_M(A, B, layout, W, S)
    An, Bn, new = lowrank_svd_redistribute(A, B, layout, W, [12], torch.tensor(S), out_scaling=1.0)
    assert An.dtype == dtype
    assert rel_err(client_product(An, Bn, new, 0, 1.0), M) < tol


def test_redistribute_lists_of_layers_equal_layer_by_layer():
    layout = AdapterLayout(SENDERS)
    layers = [make(SENDERS, di, do, seed=4 + i) for i, (di, do) in enumerate([(8, 6), (15, 20), (4, 9)])]
    As, Bs = [a for a, _ in layers], [b for _, b in layers]
    ranks = [3, 6, 2, 5]
    An, Bn, new = lowrank_svd_redistribute(As, Bs, layout, W, ranks, S)
    for i, (a, b) in enumerate(layers):
        a1, b1, _ = lowrank_svd_redistribute(a, b, layout, W, ranks, S)
        for k in range(len(ranks)):  # SVD signs may differ between calls: compare products
            torch.testing.assert_close(client_product(An[i], Bn[i], new, k, 1.0), client_product(a1, b1, new, k, 1.0))


def test_redistribute_default_out_scaling_is_scaling():
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 10, 10, seed=8)
    M = dense_M(A, B, layout, W, S)
    An, Bn, new = lowrank_svd_redistribute(A, B, layout, W, [12, 12, 12, 12], torch.tensor(S))
    for k in range(4):
        assert rel_err(client_product(An, Bn, new, k, S[k]), M) < 1e-10


def test_stacked_svd_matches_dense():
    A, B = make([3, 4], 9, 7, seed=9)
    coef = torch.randn(7, dtype=torch.float64)
    U, sv, Vh = stacked_svd(A, B, coef)
    M = (B * coef[:, None]).t() @ A
    torch.testing.assert_close(U @ torch.diag(sv) @ Vh, M)
    torch.testing.assert_close(sv, torch.linalg.svdvals(M))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_flora_stack_product_is_weighted_sum(dtype, tol):
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 11, 7, dtype, seed=10)
    As, Bs = flora_stack(A, B, layout, W, torch.tensor(S))
    assert As.shape == A.shape and Bs.shape == B.shape and Bs.dtype == dtype
    assert torch.equal(As, A) and As.data_ptr() != A.data_ptr()
    assert rel_err(Bs.double().t() @ As.double(), dense_M(A, B, layout, W, S)) < tol
    # receivers' own scaling divided out of B
    As2, Bs2 = flora_stack(A, B, layout, W, S, out_scaling=4.0)
    assert rel_err(4.0 * Bs2.double().t() @ As2.double(), dense_M(A, B, layout, W, S)) < tol


def test_flora_stack_lists():
    layout = AdapterLayout(SENDERS)
    layers = [make(SENDERS, di, do, seed=11 + i) for i, (di, do) in enumerate([(5, 8), (12, 3)])]
    As, Bs = flora_stack([a for a, _ in layers], [b for _, b in layers], layout, W)
    for (a, b), a_s, b_s in zip(layers, As, Bs):
        torch.testing.assert_close(b_s.t() @ a_s, dense_M(a, b, layout, W, [1.0] * 4))


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_rank_above_total_rank_raises():
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 8, 8)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 13"):
        lowrank_svd_redistribute(A, B, layout, W, [2, 13], 1.0)
    with pytest.raises(ValueError, match="positive"):
        lowrank_svd_redistribute(A, B, layout, W, [0, 2], 1.0)


@pytest.mark.parametrize("which", ["A", "B"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_client_raises_naming_it(which, bad):
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 8, 6)
    (A if which == "A" else B)[layout.offsets[3] + 2, 1] = bad
    with pytest.raises(ValueError, match=f"{which} holds non-finite values in adapter 3"):
        lowrank_svd_redistribute(A, B, layout, W, [2, 2, 2, 2], 1.0)
    with pytest.raises(ValueError, match="adapter 3"):
        flora_stack(A, B, layout, W)
    with pytest.raises(ValueError, match=r"\[1\] holds non-finite values in adapter 3"):
        lowrank_svd_redistribute([A.clone().nan_to_num(0, 0, 0), A], [B.clone().nan_to_num(0, 0, 0), B], layout, W, [2])


def test_bad_weights_and_scalings_raise():
    layout = AdapterLayout(SENDERS)
    A, B = make(SENDERS, 8, 6)
    with pytest.raises(ValueError, match="weights"):
        lowrank_svd_redistribute(A, B, layout, torch.tensor([1.0, float("nan"), 0, 0]), [2], 1.0)
    with pytest.raises(ValueError, match="out_scaling"):
        lowrank_svd_redistribute(A, B, layout, W, [2, 3], S)  # per-sender scaling, 2 receivers
    with pytest.raises(ValueError, match="receiver 1"):
        lowrank_svd_redistribute(A, B, layout, W, [2, 3], 1.0, out_scaling=[1.0, 0.0])
    with pytest.raises(ValueError, match="out_scaling"):
        flora_stack(A, B, layout, W, out_scaling=0.0)
    with pytest.raises(ValueError, match="rows"):
        lowrank_svd_redistribute(A[:-1], B[:-1], layout, W, [2], 1.0)
