"""The triton backend of lora_delta / lora_linear against a float64 dense computation.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py sets
it), so shapes stay small; the ``gpu``-marked tests take bigger shapes on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import AdapterLayout, TokenGroups

triton_pkg = pytest.importorskip("hetlora_kernels.triton")
from hetlora_kernels.triton import fused, lora, schedule, wgrad  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# relative Frobenius error vs float64 (DESIGN.md section 5; fp16 sits between fp32 and bf16)
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(
    not hk.backend_status("triton", DEV)[0], reason=f"triton backend unavailable: {hk.backend_status('triton', DEV)[1]}"
)


# ---------------------------------------------------------------------------------------------
# float64 oracle: each adapter's dense delta W_k = s_k B_k^T A_k, applied token by token
# ---------------------------------------------------------------------------------------------
def dense64(x, A, B, ranks, ids, scales, weight=None, bias=None):
    """float64 ``y`` with autograd, from leaf float64 copies of x, A, B (and weight, bias)."""
    ids = ids.to(x.device)
    y = x.new_zeros(x.shape[0], B.shape[1])
    off = 0
    for k, r in enumerate(ranks):
        dW = scales[k] * B[off : off + r].t() @ A[off : off + r]  # [d_out, d_in]
        sel = (ids == k).nonzero().squeeze(1)
        y = y.index_add(0, sel, x[sel] @ dW.t())
        off += r
    if weight is not None:
        y = y + x @ weight.t()
        if bias is not None:
            y = y + bias
    return y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_case(ranks, ids, d_in, d_out, dtype, seed, scale_kind="tensor"):
    g = torch.Generator().manual_seed(seed)
    R, K, T = sum(ranks), len(ranks), len(ids)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    A = (torch.randn(R, d_in, generator=g) / d_in**0.5).to(dtype)
    B = (torch.randn(R, d_out, generator=g) / 4).to(dtype)
    dy = torch.randn(T, d_out, generator=g).to(dtype)
    if scale_kind == "tensor":
        s = torch.rand(K, generator=g) * 2 + 0.25
        scales = s.tolist()
    else:
        s = 1.75
        scales = [s] * K
    return x, A, B, dy, s, scales


def run_triton(x, A, B, dy, layout, groups, s, dev=DEV):
    xs, As, Bs = (t.to(dev).clone().requires_grad_() for t in (x, A, B))
    s_dev = s.to(dev) if isinstance(s, torch.Tensor) else s
    with hk.use_backend("triton"):
        y = hk.lora_delta(xs, As, Bs, layout, groups.to(dev), s_dev)
        y.backward(dy.to(dev))
    return y.detach(), xs.grad, As.grad, Bs.grad


def run_dense(x, A, B, dy, ranks, ids, scales):
    x64, A64, B64 = (t.detach().double().clone().requires_grad_() for t in (x, A, B))
    y = dense64(x64, A64, B64, ranks, ids, scales)
    y.backward(dy.double())
    return y.detach(), x64.grad, A64.grad, B64.grad


def check_all(got, want, dtype, ids, ranks=None):
    names = ("y", "dx", "dA", "dB")
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, name
        a = a.cpu()
        assert torch.isfinite(a).all(), f"{name} holds non-finite values"
        err = rel(a, b)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"
    unrouted = ids < 0
    assert (got[0].cpu()[unrouted] == 0).all(), "rows of -1 tokens must be exactly 0"
    assert (got[1].cpu()[unrouted] == 0).all(), "dx rows of -1 tokens must be exactly 0"
    if ranks is not None:  # adapters without tokens get exactly zero gradients
        off = 0
        for k, r in enumerate(ranks):
            if not (ids == k).any():
                assert (got[2].cpu()[off : off + r] == 0).all() and (got[3].cpu()[off : off + r] == 0).all(), k
            off += r


def mixed_ids(T: int, K: int, seed: int, empty: int | None = 2) -> torch.Tensor:
    """Unsorted ids with some -1 tokens and one adapter left without tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, K, (T,), generator=g)
    if empty is not None:
        ids[ids == empty] = (empty + 1) % K
    ids[0] = -1
    return ids


# ---------------------------------------------------------------------------------------------
# correctness on the interpreter (or the GPU when there is one)
# ---------------------------------------------------------------------------------------------
class LaunchSpy:
    """Stands in for a kernel object and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(params=["fused", "split"])
def forward_path(request, monkeypatch):
    """Run the test with the one-launch fused forward, then with shrink + expand."""
    monkeypatch.setattr(fused, "FORCE_FUSED", request.param == "fused")
    spy = LaunchSpy(fused._fused_fwd_kernel)
    monkeypatch.setattr(fused, "_fused_fwd_kernel", spy)
    yield request.param
    if request.param == "split":
        # a fused backward (the wgrad_path fixture) launches the same kernel once per call
        backward = len(getattr(request.node, "fused_backward_calls", []))
        assert spy.launches == backward, "the fused kernel ran on the split forward path"


@pytest.fixture(params=["split", "pair", "fused", "fused+pair"])
def wgrad_path(request, monkeypatch):
    """Run the test through each backward: g and dx by shrink + expand, or in one fused launch
    (``lora.FUSED_BACKWARD``); dA and dB in two launches, or in one (``lora.PAIR_WGRAD``)."""
    pair, fused_bwd = "pair" in request.param, "fused" in request.param
    monkeypatch.setattr(lora, "PAIR_WGRAD", pair)
    monkeypatch.setattr(lora, "FUSED_BACKWARD", fused_bwd)
    spy = LaunchSpy(wgrad._wgrad_pair_kernel)
    monkeypatch.setattr(wgrad, "_wgrad_pair_kernel", spy)
    fwd_calls = request.node.fused_backward_calls = []
    real_fused = lora.fused_forward
    monkeypatch.setattr(lora, "fused_forward", lambda *a, **k: fwd_calls.append(a[0].shape) or real_fused(*a, **k))
    yield request.param
    if pair:
        assert spy.launches >= 1, "the paired weight-gradient kernel never ran"
    else:
        assert spy.launches == 0, "the paired kernel ran on the separate path"
    if fused_bwd:
        assert fwd_calls, "the fused kernel never ran in the backward"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_lora_delta_mixed_ranks(dtype, scale_kind, forward_path, wgrad_path):
    ranks = [1, 3, 7, 16]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(48, len(ranks), seed=11)
    groups = TokenGroups.from_adapter_ids(ids, len(ranks))
    x, A, B, dy, s, scales = make_case(ranks, ids, 37, 29, dtype, seed=5, scale_kind=scale_kind)
    got = run_triton(x, A, B, dy, layout, groups, s)
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), dtype, ids, ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_rank_tiles(dtype, forward_path, wgrad_path):
    """Ranks above the 16-wide rank tile (2 and 3 tiles) mixed with rank 1 and 64."""
    ranks = [33, 1, 20, 64]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(40, len(ranks), seed=3, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, len(ranks))
    x, A, B, dy, s, scales = make_case(ranks, ids, 24, 40, dtype, seed=9)
    got = run_triton(x, A, B, dy, layout, groups, s)
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), dtype, ids)


def test_sorted_groups_from_lengths():
    ranks = [7, 1, 16]
    lengths = [20, 0, 13]
    layout = AdapterLayout(ranks)
    groups = TokenGroups.from_lengths(lengths)
    ids = groups.adapter_ids.clone()
    x, A, B, dy, s, scales = make_case(ranks, ids, 33, 17, torch.float32, seed=2)
    got = run_triton(x, A, B, dy, layout, groups, s)
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), torch.float32, ids, ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_lora_linear(dtype, forward_path, wgrad_path):
    ranks = [3, 16, 1]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(36, len(ranks), seed=4, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, len(ranks))
    x, A, B, dy, s, scales = make_case(ranks, ids, 29, 21, dtype, seed=6)
    gen = torch.Generator().manual_seed(8)
    W = (torch.randn(21, 29, generator=gen) / 5).to(dtype)
    b = torch.randn(21, generator=gen).to(dtype)
    leaves = [t.to(DEV).clone().requires_grad_() for t in (x, W, b, A, B)]
    with hk.use_backend("triton"):
        y = hk.lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], layout, groups.to(DEV), s.to(DEV))
        y.backward(dy.to(DEV))
    ref = [t.detach().double().clone().requires_grad_() for t in (x, W, b, A, B)]
    y64 = dense64(ref[0], ref[3], ref[4], ranks, ids, scales, weight=ref[1], bias=ref[2])
    y64.backward(dy.double())
    tol = TOL[dtype]
    assert y.dtype == dtype
    assert rel(y.detach().cpu(), y64.detach()) < tol
    for name, a, r in zip(("dx", "dW", "db", "dA", "dB"), leaves, ref):
        assert a.grad.dtype == dtype, name
        assert rel(a.grad.cpu(), r.grad) < tol, name


def test_lora_linear_no_bias_frozen_weight_matches_delta(forward_path):
    ranks = [1, 7]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(24, 2, seed=1, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 2).to(DEV)
    x, A, B, dy, s, _ = make_case(ranks, ids, 16, 16, torch.float32, seed=3, scale_kind="float")
    W = torch.randn(16, 16).to(DEV)
    xs, As, Bs = (t.to(DEV).clone().requires_grad_() for t in (x, A, B))
    with hk.use_backend("triton"):
        y = hk.lora_linear(xs, W, None, As, Bs, layout, groups, s)
        y.backward(dy.to(DEV))
        delta = hk.lora_delta(x.to(DEV), A.to(DEV), B.to(DEV), layout, groups, s)
    torch.testing.assert_close(y.detach(), x.to(DEV) @ W.t() + delta, rtol=1e-5, atol=1e-5)
    # -1 tokens get exactly the base gradient dy W
    unrouted = ids.to(DEV) < 0
    torch.testing.assert_close(xs.grad[unrouted], (dy.to(DEV) @ W)[unrouted], rtol=0, atol=0)


@pytest.mark.parametrize("which", ["x", "A", "B", "AB"])
@pytest.mark.parametrize("op", ["delta", "linear"])
def test_partial_requires_grad(which, op):
    """Only some inputs need gradients: the others get none, the asked ones stay right."""
    ranks = [3, 16, 1]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(24, 3, seed=51, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 3).to(DEV)
    x, A, B, dy, s, scales = make_case(ranks, ids, 20, 12, torch.float32, seed=53)
    W = torch.randn(12, 20)
    leaves = {n: t.to(DEV).clone().requires_grad_(n in which) for n, t in zip("xAB", (x, A, B))}
    with hk.use_backend("triton"):
        if op == "delta":
            y = hk.lora_delta(leaves["x"], leaves["A"], leaves["B"], layout, groups, s.to(DEV))
        else:
            y = hk.lora_linear(leaves["x"], W.to(DEV), None, leaves["A"], leaves["B"], layout, groups, s.to(DEV))
        y.backward(dy.to(DEV))
    want = run_dense(x, A, B, dy, ranks, ids, scales)
    if op == "linear":
        want = (want[0], want[1] + dy.double() @ W.double(), want[2], want[3])
    for i, n in enumerate("xAB", start=1):
        g = leaves[n].grad
        if n in which:
            assert rel(g.cpu(), want[i]) < 1e-4, n
        else:
            assert g is None, n


def test_noncontiguous_inputs():
    ranks = [3, 7, 1, 16]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(32, 4, seed=21)
    groups = TokenGroups.from_adapter_ids(ids, 4)
    x, A, B, dy, s, scales = make_case(ranks, ids, 20, 26, torch.float32, seed=13)
    # x and dy as column-major views, A and B as strided column slices of wider tensors
    x_nc = x.t().contiguous().t()
    A_wide = torch.randn(A.shape[0], 2 * A.shape[1])
    A_wide[:, ::2] = A
    B_wide = torch.randn(B.shape[0], B.shape[1] + 5)
    B_wide[:, 5:] = B
    A_nc, B_nc = A_wide[:, ::2], B_wide[:, 5:]
    assert not x_nc.is_contiguous() and not A_nc.is_contiguous() and not B_nc.is_contiguous()
    dy_nc = dy.t().contiguous().t()
    got = run_triton(x_nc, A_nc, B_nc, dy_nc, layout, groups, s)
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), torch.float32, ids)


def test_broadcast_grad_and_sum_loss():
    """``y.sum().backward()`` hands the backward an expanded (stride-0) dy."""
    ranks = [3, 5]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(20, 2, seed=5, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 2).to(DEV)
    x, A, B, _, s, scales = make_case(ranks, ids, 12, 9, torch.float32, seed=4)
    xs, As, Bs = (t.to(DEV).clone().requires_grad_() for t in (x, A, B))
    with hk.use_backend("triton"):
        hk.lora_delta(xs, As, Bs, layout, groups, s.to(DEV)).sum().backward()
    want = run_dense(x, A, B, torch.ones(20, 9), ranks, ids, scales)
    for a, b in zip((xs.grad, As.grad, Bs.grad), want[1:]):
        assert rel(a.cpu(), b) < 1e-4


def test_t_zero_and_all_unrouted(forward_path):
    ranks = [3, 1]
    layout = AdapterLayout(ranks)
    for T, ids in ((0, torch.zeros(0, dtype=torch.int64)), (9, torch.full((9,), -1))):
        groups = TokenGroups.from_adapter_ids(ids, 2)
        x, A, B, dy, s, _ = make_case(ranks, ids, 8, 6, torch.float32, seed=T)
        y, dx, dA, dB = run_triton(x, A, B, dy, layout, groups, s)
        assert y.shape == (T, 6) and dx.shape == (T, 8)
        assert (y == 0).all() and (dx == 0).all()
        assert (dA == 0).all() and (dB == 0).all()


def test_lora_linear_t_zero_and_all_unrouted(forward_path):
    layout = AdapterLayout([4, 2])
    for ids in (torch.zeros(0, dtype=torch.int64), torch.full((5,), -1)):
        groups = TokenGroups.from_adapter_ids(ids, 2).to(DEV)
        T = len(ids)
        x = torch.randn(T, 6, device=DEV, requires_grad=True)
        W = torch.randn(3, 6, device=DEV, requires_grad=True)
        b = torch.randn(3, device=DEV, requires_grad=True)
        A = torch.randn(6, 6, device=DEV, requires_grad=True)
        B = torch.randn(6, 3, device=DEV, requires_grad=True)
        with hk.use_backend("triton"):
            y = hk.lora_linear(x, W, b, A, B, layout, groups, 0.5)
            y.square().sum().backward()
        torch.testing.assert_close(y, x @ W.t() + b)
        torch.testing.assert_close(x.grad, (2 * y @ W).detach())
        assert (A.grad == 0).all() and (B.grad == 0).all()


def test_many_adapters_few_tokens():
    """24 adapters, most with 0-3 tokens: many tiny groups, some empty ones."""
    ranks = [1 + (7 * k) % 16 for k in range(24)]
    layout = AdapterLayout(ranks)
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(-1, 24, (40,), generator=g)
    groups = TokenGroups.from_adapter_ids(ids, 24)
    x, A, B, dy, s, scales = make_case(ranks, ids, 16, 24, torch.float32, seed=43)
    got = run_triton(x, A, B, dy, layout, groups, s)
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), torch.float32, ids, ranks)


def test_wgrad_chunk_heuristic(monkeypatch):
    """The GPU's choice between one pass and two stages (pure host logic, checked here)."""
    monkeypatch.setattr(wgrad, "INTERPRET", False)
    monkeypatch.setattr(wgrad, "FORCE_CHUNK_T", None)
    dev = torch.device("cpu")  # sm_count() assumes 132 multiprocessors off the GPU
    small = TokenGroups.from_lengths([100, 0, 300])
    assert wgrad._pick_chunk(small, AdapterLayout([8, 8, 8]), 4096, dev) is None
    few_big = TokenGroups.from_lengths([8192, 4096])
    chunk = wgrad._pick_chunk(few_big, AdapterLayout([16, 8]), 1024, dev)
    assert chunk is not None and chunk >= 256 and chunk & (chunk - 1) == 0 and chunk < 8192
    chunks, cstarts, _ = schedule.token_chunks(few_big, chunk)
    rows = chunks.tolist()
    assert cstarts.tolist()[-1] == len(rows)
    assert sum(p1 - p0 for _, p0, p1 in rows) == 8192 + 4096
    # enough programs already: one pass
    many = TokenGroups.from_lengths([1024] * 64)
    assert wgrad._pick_chunk(many, AdapterLayout([16] * 64), 4096, dev) is None


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-pass", "two-stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d_in, d_out", [(24, 40), (40, 17)])
@pytest.mark.parametrize("scale_a", [False, True], ids=["dA-unscaled", "dA-scaled"])
def test_wgrad_pair_equals_the_two_calls(chunk, dtype, d_in, d_out, scale_a):
    """One launch for dA and dB gives what two launches give: bitwise where both run the same
    block sizes (the interpreter, or one autotune config), else within the dtype's tolerance."""
    ranks = [7, 16, 1, 3]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(50, 4, seed=41)
    groups = TokenGroups.from_adapter_ids(ids, 4).to(DEV)
    gen = torch.Generator().manual_seed(43)
    T = len(ids)
    g, h = (torch.randn(T, layout.max_rank, generator=gen).to(DEV) for _ in range(2))
    x = torch.randn(T, d_in, generator=gen).to(dtype).to(DEV)
    dy = torch.randn(T, d_out, generator=gen).to(dtype).to(DEV)
    s = (torch.rand(4, generator=gen) + 0.5).to(DEV)
    dA = wgrad.wgrad(g, x, layout, groups, s if scale_a else 1.0, chunk)
    want = (dA, wgrad.wgrad(h, dy, layout, groups, s, chunk))
    got = wgrad.wgrad_pair(g, x, h, dy, layout, groups, s, chunk, scale_a=scale_a)
    one_config = schedule.INTERPRET or len(schedule.tuning(wgrad._CONFIGS, {})[0]) == 1
    for name, a, b in zip(("dA", "dB"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        if one_config:
            assert torch.equal(a, b), name
        else:
            assert rel(a.float().cpu(), b.float().cpu()) < TOL[dtype], name
    assert (got[0][layout.rows(2)] == 0).all() and (got[1][layout.rows(2)] == 0).all()  # adapter 2 idle


def test_float64_falls_back_to_reference():
    ranks = [2, 5]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(10, 2, seed=0, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 2)
    x, A, B, dy, s, scales = make_case(ranks, ids, 6, 7, torch.float64, seed=1)
    got = run_triton(x, A, B, dy, layout, groups, s)
    want = run_dense(x, A, B, dy, ranks, ids, scales)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and rel(a.cpu(), b) < 1e-12


# ---------------------------------------------------------------------------------------------
# poisoned buffers, determinism, schedule
# ---------------------------------------------------------------------------------------------
def test_poisoned_buffers_never_leak(monkeypatch, forward_path, wgrad_path):
    """Every torch.empty the kernels allocate starts as NaN: an element that a kernel reads
    without writing it first (or forgets to write) would surface as NaN or a wrong value."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    ranks = [1, 16, 7, 3]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(40, 4, seed=17)
    groups = TokenGroups.from_adapter_ids(ids, 4)
    x, A, B, dy, s, scales = make_case(ranks, ids, 30, 22, torch.float32, seed=19)
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(wgrad, "FORCE_CHUNK_T", 5)  # the two-stage path's workspace too
    spy = LaunchSpy(wgrad._wgrad_reduce_kernel)
    monkeypatch.setattr(wgrad, "_wgrad_reduce_kernel", spy)
    got = run_triton(x, A, B, dy, layout, groups, s)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert spy.launches == 2, "two-stage path not exercised for dA and dB"
    check_all(got, run_dense(x, A, B, dy, ranks, ids, scales), torch.float32, ids, ranks)


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-pass", "two-stage"])
def test_weight_grads_bitwise_deterministic(monkeypatch, chunk):
    monkeypatch.setattr(wgrad, "FORCE_CHUNK_T", chunk)
    ranks = [7, 16, 1]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(64, 3, seed=23, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 3)
    x, A, B, dy, s, scales = make_case(ranks, ids, 32, 24, torch.bfloat16, seed=29)
    spy = LaunchSpy(wgrad._wgrad_reduce_kernel)
    monkeypatch.setattr(wgrad, "_wgrad_reduce_kernel", spy)
    first = run_triton(x, A, B, dy, layout, groups, s)
    second = run_triton(x, A, B, dy, layout, groups, s)
    assert spy.launches == (0 if chunk is None else 4)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_all(first, run_dense(x, A, B, dy, ranks, ids, scales), torch.bfloat16, ids)


def test_schedule_is_cached_and_partitions_tokens():
    ranks = [3, 1, 5]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(50, 3, seed=31, empty=1)
    groups = TokenGroups.from_adapter_ids(ids, 3).to(DEV)
    x, A, B, _, s, _ = (
        t.to(DEV) if isinstance(t, torch.Tensor) else t for t in make_case(ranks, ids, 8, 8, torch.float32, seed=2)
    )
    with hk.use_backend("triton"):
        hk.lora_delta(x, A, B, layout, groups, s)
    keys = [k for k in groups._cache if isinstance(k, tuple) and k[0] == "hetlora_token_tiles"]
    assert keys, "the tile schedule should be cached on the TokenGroups"
    cached = groups._cache[keys[0]]
    with hk.use_backend("triton"):
        hk.lora_delta(x, A, B, layout, groups, s)
    assert groups._cache[keys[0]] is cached
    for block_t in (16, 64):
        tiles, n_unrouted = schedule.token_tiles(groups, block_t)
        tiles = tiles.cpu().tolist()
        covered = []
        for i, (a, p0, p1) in enumerate(tiles):
            assert (a < 0) == (i < n_unrouted)
            lo, hi = (0, groups.starts_list[0]) if a < 0 else (groups.starts_list[a], groups.starts_list[a + 1])
            assert lo <= p0 < hi and p1 == hi
            covered += range(p0, min(p0 + block_t, p1))
        assert covered == list(range(50))


# ---------------------------------------------------------------------------------------------
# GPU: bigger shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [None, 32], ids=["auto", "two-stage"])
@pytest.mark.parametrize("fused_fwd", [None, True], ids=["auto-fwd", "fused-fwd"])
def test_gpu_large_mixed(dtype, chunk, fused_fwd, monkeypatch):
    monkeypatch.setattr(wgrad, "FORCE_CHUNK_T", chunk)
    monkeypatch.setattr(fused, "FORCE_FUSED", fused_fwd)
    ranks = [1, 3, 7, 16, 64, 33, 8, 2] * 4
    K = len(ranks)
    layout = AdapterLayout(ranks)
    T, d_in, d_out = 3000, 1000, 777
    ids = mixed_ids(T, K, seed=7, empty=5)
    groups = TokenGroups.from_adapter_ids(ids, K)
    x, A, B, dy, s, scales = make_case(ranks, ids, d_in, d_out, dtype, seed=8)
    assert fused.use_fused(groups, layout, d_in, d_out, x.element_size()) == bool(fused_fwd)
    got = run_triton(x, A, B, dy, layout, groups, s)
    xd, Ad, Bd, dyd = (t.to("cuda") for t in (x, A, B, dy))
    want = run_dense(xd, Ad, Bd, dyd, ranks, ids.cuda(), scales)
    want = tuple(w.cpu() for w in want)
    check_all(tuple(g.cpu() for g in got), want, dtype, ids)
    again = run_triton(x, A, B, dy, layout, groups, s)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_lora_linear_bf16():
    ranks = [16, 4, 64, 1]
    layout = AdapterLayout(ranks)
    T, d = 2048, 512
    ids = mixed_ids(T, 4, seed=3, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 4).to("cuda")
    x, A, B, dy, s, scales = make_case(ranks, ids, d, d, torch.bfloat16, seed=4)
    W = (torch.randn(d, d) / d**0.5).to(torch.bfloat16)
    leaves = [t.cuda().clone().requires_grad_() for t in (x, A, B)]
    with hk.use_backend("triton"):
        y = hk.lora_linear(leaves[0], W.cuda(), None, leaves[1], leaves[2], layout, groups, s.cuda())
        y.backward(dy.cuda())
    ref = [t.double().cuda().requires_grad_() for t in (x, A, B)]
    y64 = dense64(ref[0], ref[1], ref[2], ranks, ids.cuda(), scales, weight=W.double().cuda())
    y64.backward(dy.double().cuda())
    assert rel(y.detach(), y64.detach()) < 2e-2
    for a, r in zip(leaves, ref):
        assert rel(a.grad, r.grad) < 2e-2


def test_kernels_compile_for_hopper():
    """The interpreter never lowers a kernel: compile them for sm_90 (no GPU needed), in a
    process without TRITON_INTERPRET, and check that the bf16 paths use tensor cores."""
    import os
    import subprocess
    import sys

    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip(f"aot_check uses the Triton >= 3.3 compile API, this is {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "ignore", "-m", "hetlora_kernels.triton.aot_check", "--caps", "90", "--dtypes", "bf16"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("sm_90")]
    names = sorted(ln.split()[1] for ln in lines)
    assert names == ["expand", "fused", "shrink", "wgrad", "wgrad_pair", "wgrad_reduce"], res.stdout
    for ln in lines:
        if "wgrad_reduce" not in ln:
            assert "mma=wgmma" in ln, ln


def test_fused_forward_heuristic(monkeypatch):
    monkeypatch.setattr(fused, "FORCE_FUSED", None)
    small = TokenGroups.from_lengths([20, 12])
    big = TokenGroups.from_lengths([2000, 3000])
    layout = AdapterLayout([8, 16])
    assert fused.use_fused(small, layout, 1024, 1024, 2)
    assert not fused.use_fused(big, layout, 1024, 1024, 2)
    assert not fused.use_fused(small, AdapterLayout([8, 128]), 1024, 1024, 2)  # rank above the limit
    assert not fused.use_fused(TokenGroups.from_adapter_ids([-1, -1], 2), layout, 64, 64, 2)  # nothing routed


@pytest.mark.gpu
def test_gpu_few_adapters_many_tokens_two_stage(monkeypatch):
    """Two adapters, 16k tokens: the heuristic splits each adapter's tokens into chunks."""
    monkeypatch.setattr(wgrad, "FORCE_CHUNK_T", None)
    spy = LaunchSpy(wgrad._wgrad_reduce_kernel)
    monkeypatch.setattr(wgrad, "_wgrad_reduce_kernel", spy)
    ranks = [16, 64]
    layout = AdapterLayout(ranks)
    ids = mixed_ids(16384, 2, seed=9, empty=None)
    groups = TokenGroups.from_adapter_ids(ids, 2)
    x, A, B, dy, s, scales = make_case(ranks, ids, 256, 320, torch.bfloat16, seed=10)
    got = run_triton(x, A, B, dy, layout, groups, s)
    assert spy.launches == 2
    want = run_dense(*(t.cuda() for t in (x, A, B, dy)), ranks, ids.cuda(), scales)
    check_all(tuple(g.cpu() for g in got), tuple(w.cpu() for w in want), torch.bfloat16, ids)
    again = run_triton(x, A, B, dy, layout, groups, s)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["lora_delta", "lora_linear"])
def test_a_scaling_tensor_changed_after_the_forward_fails_the_backward(op):
    """A [K] float32 scaling on x's device reaches the kernels uncopied: changed in place before the
    backward, it would scale the gradient by values the forward never used.  The backward refuses
    it, as autograd refuses any saved tensor changed in place."""
    ranks = [2, 3]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g).to(DEV).requires_grad_()
    A = torch.randn(5, 8, generator=g).to(DEV).requires_grad_()
    B = torch.randn(5, 4, generator=g).to(DEV).requires_grad_()
    groups = TokenGroups.from_adapter_ids(torch.tensor([0, 1, 1, 0, -1, 1]).to(DEV), 2)
    s = torch.tensor([0.5, 2.0], device=DEV)
    with hk.use_backend("triton"):
        if op == "lora_delta":
            y = hk.lora_delta(x, A, B, AdapterLayout(ranks), groups, s)
        else:
            y = hk.lora_linear(x, torch.randn(4, 8).to(DEV), None, A, B, AdapterLayout(ranks), groups, s)
        y.sum().backward()  # unchanged: fine
        y = hk.lora_delta(x, A, B, AdapterLayout(ranks), groups, s) if op == "lora_delta" else \
            hk.lora_linear(x, torch.randn(4, 8).to(DEV), None, A, B, AdapterLayout(ranks), groups, s)
        s.mul_(10)
        with pytest.raises(RuntimeError, match="scaling was modified in place"):
            y.sum().backward()
