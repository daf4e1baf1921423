"""Robust weighting: a client that scales its LoRA factors 100x against HetLoRA's ``norm_cap``
and against client-level DP clipping, on hand-made updates.

The bound, derived from the rule in `HetLoRA.aggregation_weights` (strategies.py):
per layer (or per client, summed over layers) ``n_k = ||s_k B_k^T A_k||_F``; with the cap,
``ñ_k = min(n_k, c · med)`` where ``med`` is torch's median of the K norms (the lower
median, element ``(K-1)//2`` of the sorted norms, the malicious one included); the weights
are ``w_k = ñ_k / Σ_i ñ_i``.  If the malicious client ``m`` has the largest norm, the
sorted position of ``med`` leaves at least ``h = K - (K-1)//2 - 1`` *honest* clients with
``n_i >= med``, each contributing ``ñ_i >= min(1, c) · med``, and ``ñ_m <= c · med``, so

    w_m <= c / (c + h · min(1, c))

whatever the scale factor.  That bounds the malicious client's *weight*; the factors it
sends still enter the sum at their inflated size (``w_m · 100 A_m``), which the last tests
show, and which client-level DP (``dp_clip``) bounds instead: a client moves the DP aggregate
by at most ``S / K`` in L2 norm.
"""

import math

import pytest
import torch

from hetlora.fl import FedConfig
from hetlora.fl.privacy import dp_aggregate, flat_state
from hetlora.fl.strategies import ClientUpdate, GlobalState, HetLoRA, _pack

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = [(6, 5), (6, 7), (4, 4)]
C, D = 3, 4
R_G = 4
SCALE = 100.0


def _cfg(K, **kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=max(K, 2), clients_per_round=K, r_min=1,
                r_max=R_G, tiers=[[0.5, "min"], [0.5, "max"]], progress=False)
    base.update(kw)
    return FedConfig(**base)


def _updates(K, gen, malicious=0, scale=SCALE):
    """K honest-looking updates of mixed ranks; client ``malicious`` multiplies its A and B by ``scale``."""
    ups = []
    for k in range(K):
        r = 1 + k % R_G
        f = scale if k == malicious else 1.0
        ups.append(ClientUpdate(
            client_id=k, rank=r, rank_received=r,
            A=[f * torch.randn(r, di, generator=gen, dtype=torch.float64) for di, _ in DIMS],
            B=[f * torch.randn(r, do, generator=gen, dtype=torch.float64) for _, do in DIMS],
            scaling=1.0, head_W=torch.randn(C, D, generator=gen, dtype=torch.float64),
            head_b=torch.randn(C, generator=gen, dtype=torch.float64), num_examples=10 + 5 * k))
    return ups


def _weights(ups, K, **kw):
    As, Bs, layout = _pack(ups, len(DIMS))
    w = HetLoRA(_cfg(K, **kw)).aggregation_weights(ups, As, Bs, layout)
    return w if w.dim() == 2 else w.unsqueeze(0)


def _norms(ups, granularity):
    n = torch.tensor([[float(torch.linalg.matrix_norm(u.scaling * u.B[l].t() @ u.A[l])) for u in ups]
                      for l in range(len(DIMS))], dtype=torch.float64)
    return n.sum(0, keepdim=True) if granularity == "client" else n


def _bound(c, K):
    h = K - (K - 1) // 2 - 1  # honest clients at or above the (lower) median
    return c / (c + h * min(1.0, c))


@pytest.mark.parametrize("granularity", ["layer", "client"])
@pytest.mark.parametrize("K", [3, 4, 5, 8])
@pytest.mark.parametrize("cap", [0.5, 1.5, 3.0])
def test_capped_weight_of_a_100x_client_obeys_the_derived_bound(granularity, K, cap):
    g = torch.Generator().manual_seed(100 * K + int(10 * cap))
    m = K // 2  # not always client 0
    ups = _updates(K, g, malicious=m)
    norms = _norms(ups, granularity)
    assert bool((norms.argmax(1) == m).all())  # the 100x client has the largest norm in every layer

    plain = _weights(ups, K, aggregation=granularity)
    assert bool((plain[:, m] > 0.99).all())  # without the cap it owns the aggregate

    capped = _weights(ups, K, aggregation=granularity, norm_cap=cap)
    torch.testing.assert_close(capped.sum(1), torch.ones(capped.shape[0], dtype=torch.float64))
    for row, n in zip(capped, norms):
        med = torch.sort(n).values[(K - 1) // 2]  # lower median, as torch.median
        clipped = torch.minimum(n, cap * med)
        torch.testing.assert_close(row, clipped / clipped.sum(), rtol=1e-10, atol=1e-12)  # the rule
        assert float(row[m]) <= cap * float(med) / float(clipped.sum()) + 1e-12  # its capped share
        assert float(row[m]) <= _bound(cap, K) + 1e-12  # the data-independent bound
    # the bound does not depend on how hard the client scales: 100x and 10^4x get the same weight
    g2 = torch.Generator().manual_seed(100 * K + int(10 * cap))
    huge = _weights(_updates(K, g2, malicious=m, scale=SCALE ** 2), K, aggregation=granularity, norm_cap=cap)
    torch.testing.assert_close(huge, capped, rtol=1e-9, atol=1e-12)


def test_the_bound_is_attained_when_honest_clients_are_equal():
    # K = 5 equal honest norms: med = n, each honest ñ = min(1, c) n -> w_m = c / (c + 4 min(1, c)) exactly
    K, cap = 5, 2.0
    g = torch.Generator().manual_seed(9)
    base = _updates(1, g, malicious=-1)[0]
    ups = []
    for k in range(K):
        f = SCALE if k == 0 else 1.0
        ups.append(ClientUpdate(client_id=k, rank=base.rank, rank_received=base.rank, A=[f * a for a in base.A],
                                B=[f * b for b in base.B], scaling=1.0, head_W=base.head_W, head_b=base.head_b,
                                num_examples=10))
    w = _weights(ups, K, norm_cap=cap)
    torch.testing.assert_close(w[:, 0], torch.full((len(DIMS),), cap / (cap + 4), dtype=torch.float64))
    assert cap / (cap + 4) <= _bound(cap, K)


def test_norm_cap_bounds_the_weight_not_the_size_of_what_is_summed():
    """Documents the limit of weight capping: the 100x factors still dominate the aggregated B."""
    K = 5
    g = torch.Generator().manual_seed(3)
    ups = _updates(K, g, malicious=0)
    cfg = _cfg(K, norm_cap=2.0)
    st = GlobalState([torch.zeros(R_G, di, dtype=torch.float64) for di, _ in DIMS],
                     [torch.zeros(R_G, do, dtype=torch.float64) for _, do in DIMS], 1.0,
                     torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64))
    new = HetLoRA(cfg).aggregate(st, ups)
    w = _weights(ups, K, norm_cap=2.0)
    for l in range(len(DIMS)):
        mal = torch.zeros(R_G, DIMS[l][1], dtype=torch.float64)
        mal[: ups[0].rank] = w[l, 0] * ups[0].B[l]
        share = float(torch.linalg.matrix_norm(mal)) / float(torch.linalg.matrix_norm(new.B[l]))
        assert float(w[l, 0]) <= _bound(2.0, K) + 1e-12 and share > 0.9


@pytest.mark.parametrize("scale", [SCALE, SCALE ** 2])
def test_dp_clipping_bounds_what_one_client_can_move_the_aggregate(scale):
    K, S = 5, 0.5
    g = torch.Generator().manual_seed(4)
    ups = _updates(K, g, malicious=0, scale=scale)
    st = GlobalState([torch.zeros(R_G, di, dtype=torch.float64) for di, _ in DIMS],
                     [torch.zeros(R_G, do, dtype=torch.float64) for _, do in DIMS], 1.0,
                     torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64))
    cfg = _cfg(K, dp_clip=S, dp_noise_multiplier=0.0)
    with_m, info = dp_aggregate(st, ups, cfg, round_idx=1)
    without_m, _ = dp_aggregate(st, ups[1:], cfg, round_idx=1)  # same fixed denominator K
    moved = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(flat_state(with_m), flat_state(without_m))))
    assert moved <= S / K * (1 + 1e-12)
    assert moved == pytest.approx(S / K, rel=1e-9)  # it was clipped to exactly S
    assert info["dp_clipped"] >= 1
