"""Strategies' aggregation rules against float64 computations written out here, on hand-made updates."""

import math

import pytest
import torch

from hetlora.fl import FedConfig
from hetlora.fl.strategies import (
    ClientUpdate,
    FlexLoRA,
    FLoRA,
    FullFT,
    GlobalState,
    HetLoRA,
    HomLoRA,
    ZeroPadAvg,
    tail_norm_products,
    tail_start,
)
from hetlora.fl.validation import validate_update
from hetlora_kernels import AdapterLayout

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = [(5, 6), (5, 7)]
C, D = 3, 4  # head: classes, features


def _cfg(**kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=4, clients_per_round=3, r_min=1, r_max=4,
                tiers=[[0.5, "min"], [0.5, "max"]], progress=False)
    base.update(kw)
    return FedConfig(**base)


def _update(cid, rank, n, gen, scaling=1.0, dims=DIMS):
    return ClientUpdate(
        client_id=cid, rank=rank, rank_received=rank,
        A=[torch.randn(rank, di, generator=gen, dtype=torch.float64) for di, _ in dims],
        B=[torch.randn(rank, do, generator=gen, dtype=torch.float64) for _, do in dims],
        scaling=scaling, head_W=torch.randn(C, D, generator=gen, dtype=torch.float64),
        head_b=torch.randn(C, generator=gen, dtype=torch.float64), num_examples=n)


def _state(rank, dims=DIMS, base=False):
    A = [torch.zeros(rank, di, dtype=torch.float64) for di, _ in dims]
    B = [torch.zeros(rank, do, dtype=torch.float64) for _, do in dims]
    W = [torch.randn(do, di, dtype=torch.float64) for di, do in dims] if base else None
    bias = [torch.randn(do, dtype=torch.float64) for _, do in dims] if base else None
    return GlobalState(A, B, 1.0, torch.zeros(C, D, dtype=torch.float64), torch.zeros(C, dtype=torch.float64), W, bias)


def _pad(t, r):
    out = torch.zeros(r, t.shape[1], dtype=torch.float64)
    out[: t.shape[0]] = t
    return out


def _updates(ranks=(2, 3, 4), ns=(10, 30, 20), scalings=None):
    g = torch.Generator().manual_seed(0)
    scalings = scalings or [1.0] * len(ranks)
    return [_update(i, r, n, g, s) for i, (r, n, s) in enumerate(zip(ranks, ns, scalings))]


def _head_expected(ups):
    n = torch.tensor([u.num_examples for u in ups], dtype=torch.float64)
    p = n / n.sum()
    return sum(pk * u.head_W for pk, u in zip(p, ups)), sum(pk * u.head_b for pk, u in zip(p, ups))


@pytest.mark.parametrize("granularity", ["layer", "client"])
def test_hetlora_sparsity_weighted_aggregation(granularity):
    ups = _updates(scalings=[1.0, 0.5, 2.0])
    strat = HetLoRA(_cfg(aggregation=granularity))
    new = strat.aggregate(_state(4), ups)
    # ||s_k B_k^T A_k||_F from the dense d_out x d_in matrix
    norms = torch.tensor([[torch.linalg.matrix_norm(u.scaling * u.B[l].t() @ u.A[l]).item() for u in ups]
                          for l in range(len(DIMS))], dtype=torch.float64)
    for l in range(len(DIMS)):
        if granularity == "layer":
            p = norms[l] / norms[l].sum()
        else:
            p = norms.sum(0) / norms.sum()
        A_exp = sum(pk * _pad(u.A[l], 4) for pk, u in zip(p, ups))
        B_exp = sum(pk * _pad(u.B[l], 4) for pk, u in zip(p, ups))
        torch.testing.assert_close(new.A[l], A_exp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.B[l], B_exp, rtol=1e-12, atol=1e-12)
    hW, hb = _head_expected(ups)
    torch.testing.assert_close(new.head_W, hW)
    torch.testing.assert_close(new.head_b, hb)


def test_zeropad_and_homlora_use_data_size_weights():
    ups = _updates()
    n = torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64)
    p = n / n.sum()
    new = ZeroPadAvg(_cfg()).aggregate(_state(4), ups)
    for l in range(len(DIMS)):
        torch.testing.assert_close(new.A[l], sum(pk * _pad(u.A[l], 4) for pk, u in zip(p, ups)))
        torch.testing.assert_close(new.B[l], sum(pk * _pad(u.B[l], 4) for pk, u in zip(p, ups)))
    hom = HomLoRA(_cfg(hom_rank=3))
    assert hom.client_rank(1) == 3 and hom.global_rank == 3
    ups3 = _updates(ranks=(3, 3, 3))
    new = hom.aggregate(_state(3), ups3)
    for l in range(len(DIMS)):
        torch.testing.assert_close(new.A[l], sum(pk * u.A[l] for pk, u in zip(p, ups3)))
        torch.testing.assert_close(new.B[l], sum(pk * u.B[l] for pk, u in zip(p, ups3)))


def test_flora_merges_weighted_stacked_product_into_base():
    ups = _updates(scalings=[1.0, 0.5, 2.0])
    st = _state(1, base=True)
    W0 = [w.clone() for w in st.base_weights]
    new = FLoRA(_cfg()).aggregate(st, ups)
    n = torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64)
    p = n / n.sum()
    for l in range(len(DIMS)):
        exp = W0[l] + sum(pk * u.scaling * u.B[l].t() @ u.A[l] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.base_weights[l], exp, rtol=1e-12, atol=1e-12)
    assert new.stack_rank == 9
    # next round: fresh LoRA of each client's own rank (B zero, A non-zero, seeded)
    dist = FLoRA(_cfg()).distribute(new, [0, 2], [2, 3], round_idx=2)
    assert dist.layout.ranks == (2, 3)
    assert all(bool((b == 0).all()) for b in dist.B) and all(a.abs().sum() > 0 for a in dist.A)
    dist2 = FLoRA(_cfg()).distribute(new, [0, 2], [2, 3], round_idx=2)
    torch.testing.assert_close(dist.A[0], dist2.A[0])


def test_flexlora_svd_redistribution():
    ups = _updates(scalings=[1.0, 0.5, 2.0])
    strat = FlexLoRA(_cfg(scaling_rule="alpha/r", lora_alpha=2.0))
    new = strat.aggregate(_state(4), ups)
    assert new.stacked and new.rank == 9
    n = torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64)
    p = n / n.sum()
    dist = strat.distribute(new, [1, 3], [2, 4], round_idx=2)
    for l in range(len(DIMS)):
        M = sum(pk * u.scaling * u.B[l].t() @ u.A[l] for pk, u in zip(p, ups))  # [d_out, d_in]
        torch.testing.assert_close(new.B[l].t() @ new.A[l], M, rtol=1e-10, atol=1e-10)
        U, S, Vh = torch.linalg.svd(M)
        for j, r in enumerate((2, 4)):
            rows = dist.layout.rows(j)
            best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
            got = dist.scalings[j] * dist.B[l][rows].t() @ dist.A[l][rows]
            torch.testing.assert_close(got, best, rtol=1e-8, atol=1e-8)


def test_fullft_averages_weights():
    g = torch.Generator().manual_seed(1)
    ups = _updates(ranks=(1, 1, 1))
    for u in ups:
        u.weights = [torch.randn(do, di, generator=g, dtype=torch.float64) for di, do in DIMS]
        u.biases = [torch.randn(do, generator=g, dtype=torch.float64) for _, do in DIMS]
    new = FullFT(_cfg()).aggregate(_state(1, base=True), ups)
    p = torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64) / 60
    for l in range(len(DIMS)):
        torch.testing.assert_close(new.base_weights[l], sum(pk * u.weights[l] for pk, u in zip(p, ups)))
        torch.testing.assert_close(new.base_biases[l], sum(pk * u.biases[l] for pk, u in zip(p, ups)))


def test_truncation_distribution():
    st = _state(4)
    st.A = [torch.arange(4 * di, dtype=torch.float64).view(4, di) for di, _ in DIMS]
    st.B = [torch.arange(4 * do, dtype=torch.float64).view(4, do) for _, do in DIMS]
    d = HetLoRA(_cfg()).distribute(st, [0, 1], [2, 4], 1)
    assert d.layout.ranks == (2, 4)
    torch.testing.assert_close(d.A[0][0:2], st.A[0][:2])
    torch.testing.assert_close(d.A[0][2:6], st.A[0][:4])


# alike layers (one stack) and layers of different widths (one row sum per layer)
@pytest.mark.parametrize("widths", [[(5, 6)] * 3, [(5, 6), (7, 6), (5, 4)]])
def test_tail_norm_products_formula(widths):
    g = torch.Generator().manual_seed(3)
    layout = AdapterLayout([3, 1, 5])
    As = [torch.randn(9, di, generator=g, dtype=torch.float64) for di, _ in widths]
    Bs = [torch.randn(9, do, generator=g, dtype=torch.float64) for _, do in widths]
    Bs[0][:3] = 0  # client 0's B is zero in one layer: its product is 0 there, with a zero gradient
    gamma = 0.7
    got = tail_norm_products(As, Bs, layout, gamma)
    for k, r in enumerate(layout.ranks):
        rows = layout.rows(k)
        t = math.floor(gamma * r)
        exp = sum(torch.linalg.norm(A[rows][t:]) * torch.linalg.norm(B[rows][t:]) for A, B in zip(As, Bs))
        assert abs(float(got[k]) - float(exp)) < 1e-12
    leaves = [t.clone().requires_grad_() for t in As + Bs]
    grads = torch.autograd.grad(tail_norm_products(leaves[:3], leaves[3:], layout, gamma).sum(), leaves)
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(grads[0][:3], torch.zeros_like(grads[0][:3]))  # ||B|| = 0 there
    ref = [t.clone().requires_grad_() for t in As + Bs]
    exp = sum(torch.linalg.norm(A[layout.rows(k)][math.floor(gamma * r):]) * torch.linalg.norm(
        B[layout.rows(k)][math.floor(gamma * r):]) for k, r in enumerate(layout.ranks) if k != 0
        for A, B in zip(ref[:3], ref[3:]))
    exp = exp + sum(torch.linalg.norm(A[2:3]) * torch.linalg.norm(B[2:3]) for A, B in zip(ref[1:3], ref[4:]))
    want = torch.autograd.grad(exp, ref)
    for gr, w in zip(grads, want):
        torch.testing.assert_close(gr, w, rtol=1e-12, atol=1e-12)


def test_tail_norm_products_costs_a_fixed_number_of_ops_plus_a_few_per_layer():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    layout = AdapterLayout([2, 6, 16, 2])

    def ops(L):
        ts = [torch.randn(26, 16, requires_grad=True) for _ in range(2 * L)]
        tail_norm_products(ts[:L], ts[L:], layout, 0.5)  # the tail mask is cached per layout
        Count.n = 0
        with Count():
            torch.autograd.grad(tail_norm_products(ts[:L], ts[L:], layout, 0.5).sum(), ts)
        return Count.n

    # per layer: the layer-by-layer sum's add and its views (one layer at a time took ~70 ops)
    assert ops(12) - ops(2) <= 4 * 10


def test_self_pruning_rule_exactly():
    """Prune iff the tail norm product after local training is below its value at receipt."""
    cfg = _cfg(r_min=2, r_max=8, gamma=0.5, tiers=[[1.0, 8]])
    strat = HetLoRA(cfg)
    layout = AdapterLayout([8, 8, 8, 3])
    g = torch.Generator().manual_seed(5)
    As = [torch.randn(27, 5, generator=g, dtype=torch.float64)]
    Bs = [torch.randn(27, 6, generator=g, dtype=torch.float64)]
    ctx = strat.on_receive(As, Bs, layout)
    A2, B2 = [As[0].clone()], [Bs[0].clone()]
    # client 0: tail (rows 4:8) shrinks -> prune to floor(0.5 * 8) = 4
    A2[0][4:8] *= 0.5
    # client 1: tail grows -> keep 8;  client 2: unchanged (equal, not below) -> keep 8
    B2[0][12:16] *= 2.0
    # client 3 (rank 3, tail rows 1:3): shrinks -> floor(1.5) = 1, floored at r_min = 2
    A2[0][25:27] *= 0.1
    assert strat.post_local(ctx, A2, B2, layout) == [4, 8, 8, 2]
    # pruning off (ablation): nothing changes
    assert HetLoRA(_cfg(r_min=2, r_max=8, gamma=0.5, tiers=[[1.0, 8]], prune=False)).post_local(
        ctx, A2, B2, layout) == [8, 8, 8, 3]


def test_pruning_never_raises_a_rank_below_r_min():
    """A client below r_min (a Flower node may declare rank 1) whose tail shrank keeps its rank:
    max(r_min, floor(γ r)) alone would raise it, and its update would claim rows it never had."""
    strat = HetLoRA(_cfg(r_min=2, r_max=8, gamma=0.5, tiers=[[1.0, 8]]))
    layout = AdapterLayout([1, 8])
    g = torch.Generator().manual_seed(6)
    As = [torch.randn(9, 5, generator=g, dtype=torch.float64)]
    Bs = [torch.randn(9, 6, generator=g, dtype=torch.float64)]
    ctx = strat.on_receive(As, Bs, layout)
    A2 = [As[0] * 0.5]  # every tail shrinks
    assert strat.post_local(ctx, A2, Bs, layout) == [1, 4]


@pytest.mark.parametrize(("rank", "gamma", "start"), [(90, 0.7, 63), (100, 0.29, 29), (100, 0.57, 57),
                                                      (200, 0.57, 114), (8, 0.99, 7), (3, 0.5, 1), (50, 0.99, 49)])
def test_the_tail_starts_at_floor_gamma_r_of_the_decimal_gamma(rank, gamma, start):
    """floor(γ r) of γ as written: in binary floating point 0.7 * 90 is 62.99999999999999."""
    assert tail_start(rank, gamma) == start == math.floor(round(gamma * 100) * rank / 100)


def test_regulariser_is_lambda_times_tail_products():
    cfg = _cfg(lam=0.3, gamma=0.6)
    layout = AdapterLayout([2, 4])
    As = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True)]
    Bs = [torch.zeros(6, 6, dtype=torch.float64, requires_grad=True)]
    pen = HetLoRA(cfg).local_penalty(As, Bs, layout)
    assert pen.shape == (2,) and float(pen.detach().abs().sum()) == 0.0
    pen.sum().backward()  # zero B: gradient must be finite (no 0/0 at the norm's kink)
    assert torch.isfinite(As[0].grad).all() and torch.isfinite(Bs[0].grad).all()
    assert ZeroPadAvg(cfg).local_penalty(As, Bs, layout) is None


def test_validate_update_reasons():
    g = torch.Generator().manual_seed(0)
    ok = _update(0, 2, 5, g)
    assert validate_update(ok, DIMS, 4, (C, D)) is None
    nan = _update(1, 2, 5, g)
    nan.B[1][0, 0] = float("nan")
    assert "non-finite" in validate_update(nan, DIMS, 4, (C, D))
    shape = _update(2, 2, 5, g)
    shape.A[0] = torch.zeros(2, 4, dtype=torch.float64)
    assert "shape" in validate_update(shape, DIMS, 4, (C, D))
    big = _update(3, 5, 5, g)
    big.rank_received = 5
    assert "outside [1, 4]" in validate_update(big, DIMS, 4, (C, D))
    zero = _update(4, 2, 5, g)
    zero.rank = 0
    assert "outside" in validate_update(zero, DIMS, 4, (C, D))
    inf_head = _update(5, 2, 5, g)
    inf_head.head_W[0, 0] = float("inf")
    assert "head" in validate_update(inf_head, DIMS, 4, (C, D))


def test_flexlora_rank_above_the_stacked_rank_is_zero_padded():
    ups = _updates(ranks=(2,), ns=(10,))
    strat = FlexLoRA(_cfg())
    new = strat.aggregate(_state(4), ups)
    assert new.rank == 2
    dist = strat.distribute(new, [0, 1], [1, 4], round_idx=2)
    assert dist.layout.ranks == (1, 4)
    rows = dist.layout.rows(1)
    for l in range(len(DIMS)):
        assert bool((dist.A[l][rows][2:] == 0).all())
        M = ups[0].B[l].t() @ ups[0].A[l]
        torch.testing.assert_close(dist.B[l][rows].t() @ dist.A[l][rows], M, rtol=1e-8, atol=1e-8)


def test_flexlora_round_one_truncates_the_initial_adapter():
    st = _state(4)
    st.A = [torch.randn(4, di, dtype=torch.float64) for di, _ in DIMS]
    d = FlexLoRA(_cfg()).distribute(st, [0], [3], 1)
    torch.testing.assert_close(d.A[0], st.A[0][:3])


def test_flexlora_fallback_matches_the_kernel_path(monkeypatch):
    import builtins

    ups = _updates(scalings=[1.0, 0.5, 2.0])
    strat = FlexLoRA(_cfg(scaling_rule="alpha/r", lora_alpha=2.0))
    new = strat.aggregate(_state(4), ups)
    ref = strat.distribute(new, [0, 1], [2, 4], round_idx=2)
    real_import = builtins.__import__

    def no_lowrank(name, *a, **kw):
        if name == "hetlora_kernels.lowrank":
            raise ImportError("simulated absence")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_lowrank)
    fb = FlexLoRA(_cfg(scaling_rule="alpha/r", lora_alpha=2.0)).distribute(new, [0, 1], [2, 4], round_idx=2)
    for l in range(len(DIMS)):
        for j in range(2):
            rows = ref.layout.rows(j)
            torch.testing.assert_close(fb.B[l][rows].t() @ fb.A[l][rows], ref.B[l][rows].t() @ ref.A[l][rows],
                                       rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("granularity", ["layer", "client"])
def test_norm_cap_bounds_a_scaled_malicious_update(granularity):
    ups = _updates(ranks=(2, 3, 4, 3, 2), ns=(10, 30, 20, 15, 25))
    ups[2].B = [b * 100.0 for b in ups[2].B]  # a client inflates its update 100x
    norms = torch.tensor([[torch.linalg.matrix_norm(u.B[l].t() @ u.A[l]).item() for u in ups]
                          for l in range(len(DIMS))], dtype=torch.float64)
    if granularity == "client":
        norms = norms.sum(0, keepdim=True)
    As = [torch.cat([u.A[l] for u in ups]) for l in range(len(DIMS))]
    Bs = [torch.cat([u.B[l] for u in ups]) for l in range(len(DIMS))]
    layout = AdapterLayout([u.rank for u in ups])
    plain = HetLoRA(_cfg(aggregation=granularity)).aggregation_weights(ups, As, Bs, layout)
    assert plain.max() > 0.9  # without the cap the inflated client owns the aggregate
    w = HetLoRA(_cfg(aggregation=granularity, norm_cap=2.0)).aggregation_weights(ups, As, Bs, layout)
    w = w.reshape(-1, len(ups))
    for row, n in zip(w, norms):
        med = n.median()
        clipped = torch.minimum(n, 2.0 * med)
        torch.testing.assert_close(row, clipped / clipped.sum())  # the rule, written out
        assert row[2] <= 2.0 * med / clipped.sum() + 1e-12  # at most its capped share
        assert row[2] < 0.5
    with pytest.raises(ValueError, match="norm_cap"):
        _cfg(norm_cap=0.0).validate()


@pytest.mark.parametrize("granularity", ["layer", "client"])
def test_hetlora_weights_fall_back_to_data_sizes_where_no_norm(granularity):
    ups = _updates()
    for u in ups:  # round 1's first aggregation can see every B still zero
        u.B = [torch.zeros_like(b) for b in u.B]
    ups[1].B[1] = torch.randn_like(ups[1].B[1])  # one layer: only client 1 moved
    As = [torch.cat([u.A[l] for u in ups]) for l in range(len(DIMS))]
    Bs = [torch.cat([u.B[l] for u in ups]) for l in range(len(DIMS))]
    w = HetLoRA(_cfg(aggregation=granularity)).aggregation_weights(ups, As, Bs, _layout_of(ups))
    data = torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64) / 60.0
    if granularity == "layer":
        torch.testing.assert_close(w, torch.stack([data, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)]))
    else:  # one weight per client over all layers: client 1 holds the only norm
        torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        for u in ups:
            u.B[1] = torch.zeros_like(u.B[1])
        Bs = [torch.cat([u.B[l] for u in ups]) for l in range(len(DIMS))]
        w = HetLoRA(_cfg(aggregation=granularity)).aggregation_weights(ups, As, Bs, _layout_of(ups))
        torch.testing.assert_close(w, data)


@pytest.mark.parametrize("granularity", ["layer", "client"])
def test_hetlora_weights_stay_on_the_adapters_device(granularity, monkeypatch):
    """The norms come from the adapters' device and the data-size fallback from host numbers:
    on a GPU run they met in one ``torch.where`` and stopped every simulation after round 1.
    ``meta`` stands in for the GPU here (a mix with the host raises the same way)."""
    import hetlora.fl.strategies as strategies

    real = strategies.delta_fro_norms
    monkeypatch.setattr(strategies, "delta_fro_norms", lambda *a, **k: real(*a, **k).to("meta"))
    ups = _updates()
    As = [torch.cat([u.A[l] for u in ups]) for l in range(len(DIMS))]
    Bs = [torch.cat([u.B[l] for u in ups]) for l in range(len(DIMS))]
    w = HetLoRA(_cfg(aggregation=granularity)).aggregation_weights(ups, As, Bs, _layout_of(ups))
    assert w.device.type == "meta"
    assert w.shape == ((len(DIMS), 3) if granularity == "layer" else (3,))


def _layout_of(ups):
    return AdapterLayout([u.rank for u in ups])
