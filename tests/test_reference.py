"""The torch reference ops against float64 computations written here (DESIGN.md sections 2, 4)."""

import math

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import reference as ref

from .helpers import dense_delta, random_case, rel_err

RANKS = [1, 3, 7, 16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", [0.75, "tensor"])
def test_lora_delta_forward_matches_dense(dtype, scaling):
    x, A, B, ids = random_case(RANKS, 41, 19, 23, dtype)
    ids[ids == 2] = 0  # adapter 2 gets no token: an empty group
    layout = hk.AdapterLayout(RANKS)
    groups = hk.TokenGroups.from_adapter_ids(ids, len(RANKS))
    s = torch.tensor([0.5, 2.0, 1.0, -0.25]) if scaling == "tensor" else scaling
    y = ref.lora_delta(x, A, B, layout, groups, s)
    assert y.dtype == dtype and y.shape == (41, 23)
    expect = dense_delta(x, A, B, RANKS, ids, s)
    assert rel_err(y, expect) < TOL[dtype]
    assert torch.all(y[ids == -1] == 0)


def test_lora_delta_gradcheck_float64():
    x, A, B, ids = random_case(RANKS, 13, 5, 6, torch.float64, seed=3)
    layout = hk.AdapterLayout(RANKS)
    groups = hk.TokenGroups.from_adapter_ids(ids, len(RANKS))
    s = torch.tensor([0.5, 2.0, 1.0, -0.25])
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, A, B: ref.lora_delta(x, A, B, layout, groups, s), (x, A, B))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_delta_backward_matches_dense_autograd(dtype):
    x, A, B, ids = random_case(RANKS, 37, 11, 9, dtype, seed=5)
    layout = hk.AdapterLayout(RANKS)
    groups = hk.TokenGroups.from_adapter_ids(ids, len(RANKS))
    dy = torch.randn(37, 9).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    (ref.lora_delta(*leaves, layout, groups, 1.5) * dy).sum().backward()
    leaves64 = [t.double().requires_grad_() for t in (x, A, B)]
    (dense_delta(*leaves64, RANKS, ids, 1.5) * dy.double()).sum().backward()
    for got, want in zip(leaves, leaves64):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad, want.grad) < TOL[dtype]


def test_lora_delta_sorted_fast_path_and_unrouted_tokens():
    layout = hk.AdapterLayout([2, 5])
    x, A, B, _ = random_case([2, 5], 9, 4, 3)
    g1 = hk.TokenGroups.from_lengths([4, 5])
    assert g1.is_sorted
    ids = torch.tensor([0] * 4 + [1] * 5)
    assert rel_err(ref.lora_delta(x, A, B, layout, g1, 1.0), dense_delta(x, A, B, [2, 5], ids, 1.0)) < 1e-6
    g2 = hk.TokenGroups.from_adapter_ids(torch.full((9,), -1), 2)
    y = ref.lora_delta(x, A, B, layout, g2, 1.0)
    assert torch.equal(y, torch.zeros(9, 3))


def test_lora_delta_empty_batch_and_noncontiguous():
    layout = hk.AdapterLayout([3, 1])
    x, A, B, ids = random_case([3, 1], 8, 6, 5)
    g0 = hk.TokenGroups.from_adapter_ids(torch.empty(0, dtype=torch.long), 2)
    x0 = torch.empty(0, 6, requires_grad=True)
    y0 = ref.lora_delta(x0, A, B, layout, g0, 1.0)
    assert y0.shape == (0, 5)
    y0.sum().backward()
    assert x0.grad.shape == (0, 6)
    xt = torch.randn(6, 8).t()  # non-contiguous [8, 6]
    At = torch.randn(6, 4).t()
    g = hk.TokenGroups.from_adapter_ids(ids.clamp_min(0), 2)
    y = ref.lora_delta(xt, At, B, layout, g, 0.3)
    assert rel_err(y, dense_delta(xt, At, B, [3, 1], ids.clamp_min(0), 0.3)) < 1e-5


def test_lora_linear_adds_base():
    x, A, B, ids = random_case(RANKS, 10, 7, 4)
    W, b = torch.randn(4, 7), torch.randn(4)
    layout = hk.AdapterLayout(RANKS)
    groups = hk.TokenGroups.from_adapter_ids(ids, 4)
    y = ref.lora_linear(x, W, b, A, B, layout, groups, 2.0)
    expect = x.double() @ W.double().t() + b.double() + dense_delta(x, A, B, RANKS, ids, 2.0)
    assert rel_err(y, expect) < 1e-5
    y_nobias = ref.lora_linear(x, W, None, A, B, layout, groups, 2.0)
    assert rel_err(y_nobias, expect - b.double()) < 1e-5


# ---------------------------------------------------------------------------------------------
# server-side ops
# ---------------------------------------------------------------------------------------------
def _factors(ranks, d_in, d_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks)
    return torch.randn(R, d_in, generator=g).to(dtype), torch.randn(R, d_out, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_component_norms(dtype):
    A, B = _factors(RANKS, 9, 6, dtype)
    layout = hk.AdapterLayout(RANKS)
    n = ref.component_norms(A, B, layout)
    assert n.shape == (4, 16)
    expect = torch.zeros(4, 16, dtype=torch.float64)
    off = 0
    for k, r in enumerate(RANKS):
        for j in range(r):
            expect[k, j] = A[off + j].double().norm() * B[off + j].double().norm()
        off += r
    assert rel_err(n, expect) < TOL[dtype]
    assert torch.all(n[0, 1:] == 0)


def test_component_norms_lists_and_reduce():
    layout = hk.AdapterLayout([2, 4])
    layers = [_factors([2, 4], d, d + 3, seed=d) for d in (5, 8, 3)]
    As, Bs = [a for a, _ in layers], [b for _, b in layers]
    per = ref.component_norms(As, Bs, layout)
    assert per.shape == (3, 2, 4)
    for i, (a, b) in enumerate(layers):
        assert torch.allclose(per[i], ref.component_norms(a, b, layout))
    assert torch.allclose(ref.component_norms(As, Bs, layout, reduce="sum"), per.sum(0))


def test_component_norms_gradient_is_finite_at_zero_rows():
    layout = hk.AdapterLayout([2, 3])
    A, B = _factors([2, 3], 4, 5, torch.float64)
    B[1] = 0  # a fresh LoRA's B is zero
    A.requires_grad_(), B.requires_grad_()
    ref.component_norms(A, B, layout).sum().backward()
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
    assert torch.autograd.gradcheck(
        lambda a, b: ref.component_norms(a, b, layout),
        (A.detach().requires_grad_(), (B.detach() + 0.1).requires_grad_()),
    )


def _dense_fro(A, B, ranks, s):
    off, out = 0, []
    for k, r in enumerate(ranks):
        dW = float(s[k]) * B[off : off + r].double().t() @ A[off : off + r].double()
        out.append(torch.linalg.matrix_norm(dW))
        off += r
    return torch.stack(out)


# distinct ranks, and repeated ones (the torch path batches adapters of one rank together)
@pytest.mark.parametrize("ranks", [RANKS, [3, 1, 3, 2, 1, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_delta_fro_norms_match_dense(dtype, ranks):
    A, B = _factors(ranks, 12, 10, dtype)
    layout = hk.AdapterLayout(ranks)
    s = torch.tensor([1.0, 0.5, -2.0, 0.125, 3.0, -0.75])[: len(ranks)]
    n = ref.delta_fro_norms(A, B, layout, s)
    # float32 out for half inputs, accumulated in float32 from the same values: the float64
    # dense result is met as closely as for float32 inputs
    assert n.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expect = _dense_fro(A, B, ranks, s)
    assert rel_err(n, expect) < TOL[dtype if dtype == torch.float64 else torch.float32]
    n1 = ref.delta_fro_norms(A, B, layout)
    assert rel_err(n1 * s.abs().double(), expect) < TOL[dtype if dtype == torch.float64 else torch.float32]
    # lists: every layer its own factors and its own result
    A2, B2 = _factors(ranks, 7, 9, dtype, seed=5)
    per_layer = ref.delta_fro_norms([A, A2], [B, B2], layout, 2.0)
    assert per_layer.shape == (2, len(ranks))
    two = [2.0] * len(ranks)
    for got, (a, b) in zip(per_layer, [(A, B), (A2, B2)]):
        assert rel_err(got, _dense_fro(a, b, ranks, two)) < TOL[dtype if dtype == torch.float64 else torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_aggregate_zero_pads_and_sums(dtype):
    A, B = _factors(RANKS, 6, 5, dtype)
    layout = hk.AdapterLayout(RANKS)
    w = [0.1, -0.4, 0.3, 1.0]
    Ag, Bg = ref.weighted_aggregate(A, B, layout, w, 20)
    assert Ag.shape == (20, 6) and Bg.shape == (20, 5) and Ag.dtype == dtype
    eA = torch.zeros(20, 6, dtype=torch.float64)
    eB = torch.zeros(20, 5, dtype=torch.float64)
    off = 0
    for k, r in enumerate(RANKS):
        eA[:r] += w[k] * A[off : off + r].double()
        eB[:r] += w[k] * B[off : off + r].double()
        off += r
    assert rel_err(Ag, eA) < TOL[dtype] and rel_err(Bg, eB) < TOL[dtype]
    assert torch.all(Ag[16:] == 0)
    # weights that sum to zero are allowed
    Ag0, _ = ref.weighted_aggregate(A, B, layout, [1.0, -1.0, 0.0, 0.0])
    assert Ag0.shape == (16, 6)


def test_weighted_aggregate_rejects_bad_input():
    A, B = _factors([2, 3], 4, 4)
    layout = hk.AdapterLayout([2, 3])
    with pytest.raises(ValueError, match="out_rank"):
        ref.weighted_aggregate(A, B, layout, [0.5, 0.5], 2)
    with pytest.raises(ValueError, match="weights"):
        ref.weighted_aggregate(A, B, layout, [0.5, math.nan])
    with pytest.raises(ValueError, match="weights"):
        ref.weighted_aggregate(A, B, layout, [0.5, 0.2, 0.3])
    A[3, 1] = math.inf
    with pytest.raises(ValueError, match="adapter 1"):
        ref.weighted_aggregate(A, B, layout, [0.5, 0.5])


def test_truncate_distributes_leading_rows():
    Ag, Bg = _factors([8], 5, 4)
    A, B, layout = ref.truncate(Ag, Bg, [3, 8, 1])
    assert layout.ranks == (3, 8, 1)
    assert torch.equal(A[:3], Ag[:3]) and torch.equal(A[3:11], Ag) and torch.equal(A[11:], Ag[:1])
    assert torch.equal(B[11:], Bg[:1])
    As, Bs, layout2 = ref.truncate([Ag, Ag[:, :2]], [Bg, Bg], [2, 2])
    assert len(As) == 2 and As[1].shape == (4, 2)
    with pytest.raises(ValueError, match="ranks"):
        ref.truncate(Ag, Bg, [9])


def test_truncate_then_aggregate_roundtrip():
    """Truncation followed by aggregation with weights summing to 1 over full-rank clients is the identity."""
    Ag, Bg = _factors([6], 7, 3)
    A, B, layout = ref.truncate(Ag, Bg, [6, 6, 6])
    A2, B2 = ref.weighted_aggregate(A, B, layout, [0.2, 0.3, 0.5])
    assert torch.allclose(A2, Ag, atol=1e-6) and torch.allclose(B2, Bg, atol=1e-6)


def test_a_scaling_list_becomes_one_cached_device_tensor(monkeypatch):
    """A layer passes the same host list on every call: it becomes one float64 tensor, made once
    (on a GPU, a copy per call would also synchronise the stream), whose host values the torch
    path reads without a read-back; the cache is bounded."""
    from hetlora_kernels import checks

    vals = [0.5, 2.0, 1.0 / 3.0]
    t1 = checks.check_scaling(vals, 3, torch.device("cpu"))
    t2 = checks.check_scaling(tuple(vals), 3, torch.device("cpu"))
    assert t1 is t2 and t1.dtype == torch.float64 and t1.tolist() == vals
    assert checks.check_scaling([0.5, 2.0, 0.25], 3, torch.device("cpu")) is not t1
    assert checks.host_values(t1) == tuple(vals)
    assert checks.host_values(t1.clone()) is None  # only the cached object itself
    # the reference backend takes the host values: no .tolist() on the tensor
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("read back from the tensor"))
    assert ref._scales(t1, 3) == vals
    monkeypatch.undo()
    # same results as a float scaling per adapter (the values went through unchanged)
    x, A, B, ids = random_case([3, 1, 5], 17, 6, 4, dtype=torch.float64)
    layout, groups = hk.AdapterLayout([3, 1, 5]), hk.TokenGroups.from_adapter_ids(ids, 3)
    y = hk.lora_delta(x, A, B, layout, groups, vals)
    y_ref = hk.lora_delta(x, A, B, layout, groups, torch.tensor(vals, dtype=torch.float64))
    assert torch.equal(y, y_ref)
    for i in range(checks._SEQ_CACHE_MAX + 20):
        checks.check_scaling([float(i), 1.0, 2.0], 3, torch.device("cpu"))
    assert len(checks._SEQ_CACHE) <= checks._SEQ_CACHE_MAX
    assert checks.host_values(t1) is None  # evicted, and forgotten with it


def test_the_scaling_cache_fast_path_still_rejects_what_the_checks_reject():
    """A cached list skips the per-value checks (a layer's K floats, every call): values that only
    compare equal to a cached entry (a bool, an int) or a wrong length still take the checks."""
    from hetlora_kernels import checks

    dev = torch.device("cpu")
    ok = checks.check_scaling([1.0, 2.0, 0.5], 3, dev)
    assert checks.check_scaling([1.0, 2.0, 0.5], 3, dev) is ok  # served from the cache
    with pytest.raises(ValueError, match=r"scaling\[0\] must be a finite number, got True"):
        checks.check_scaling([True, 2.0, 0.5], 3, dev)  # True == 1.0, yet a bool is refused
    with pytest.raises(ValueError, match=r"hold K=2 values, got 3"):
        checks.check_scaling([1.0, 2.0, 0.5], 2, dev)
    assert checks.check_scaling([1, 2.0, 0.5], 3, dev).tolist() == [1.0, 2.0, 0.5]  # an int is a number
    with pytest.raises(ValueError, match=r"scaling\[1\] must be a finite number, got nan"):
        checks.check_scaling([1.0, float("nan"), 0.5], 3, dev)
    assert checks._cached_scaling([1.0, float("nan"), 0.5], dev) is None  # never entered the cache


def test_a_cached_scaling_has_one_float32_copy():
    """The kernels read float32 scales: a cached scaling gives the same float32 tensor every call
    (no cast kernel per layer call); any other tensor is cast as before."""
    from hetlora_kernels import checks

    t = checks.check_scaling([0.1, 1.0 / 3.0, 7.5], 3, torch.device("cpu"))
    f1, f2 = checks.as_float32(t), checks.as_float32(t)
    assert f1 is f2 and f1.dtype == torch.float32 and torch.equal(f1, t.to(torch.float32))
    other = t.clone()
    g = checks.as_float32(other)
    assert g is not f1 and torch.equal(g, f1)
    assert checks.as_float32(f1) is f1
