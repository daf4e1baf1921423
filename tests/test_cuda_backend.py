"""The ``cuda`` backend (hetlora_kernels._C): C++ CPU kernels here, CUDA kernels on a GPU.

Oracle: a float64 dense reference written in this file (one ``d_out x d_in`` matrix
``dW_k = s_k B_k^T A_k`` per adapter), evaluated on the same (rounded) inputs, so the
error measured is the kernels' own.  If ``_C`` was not built (no `pip install -e .` yet),
the module compiles it through the developers' JIT path (cached under build/jit) instead
of skipping: a broken build fails these tests loudly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import cuda as cuda_backend
from hetlora_kernels import dispatch

TOL = {torch.float64: 1e-12, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    """The compiled extension: the installed one, else a JIT build (errors if that fails)."""
    if cuda_backend.extension() is None:
        cuda_backend.build_jit()
    return cuda_backend.extension()


def _C():
    return cuda_backend.extension()


# ------------------------------------------------------------------------------------------
# float64 dense reference
# ------------------------------------------------------------------------------------------
def _scales(scaling, K):
    if isinstance(scaling, torch.Tensor):
        return [float(s) for s in scaling.tolist()]
    return [float(scaling)] * K


def dense_delta(x, A, B, layout, ids, scaling):
    """``y[t] = dW_{k(t)} x[t]`` in float64 with ``dW_k = s_k B_k^T A_k``; autograd-able."""
    x, A, B = x.double(), A.double(), B.double()
    y = x.new_zeros(x.shape[0], B.shape[1])
    for k, s in enumerate(_scales(scaling, layout.num_adapters)):
        rows = layout.rows(k)
        dW = s * B[rows].t() @ A[rows]  # [d_out, d_in]
        mask = (ids == k).to(x.dtype).unsqueeze(1)
        y = y + mask * (x @ dW.t())
    return y


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite output"
    den = ref.norm()
    if den == 0:
        return float(out.norm())
    return float((out - ref).norm() / den)


def make_case(name: str, dtype, device="cpu", d_in=40, d_out=24, seed=0):
    """(x, A, B, layout, groups, ids) for one of the named token/rank patterns."""
    gen = torch.Generator().manual_seed(seed)
    if name == "mixed":  # unsorted ids with -1 tokens
        layout = hk.AdapterLayout([1, 3, 7, 16])
        ids = torch.randint(-1, 4, (57,), generator=gen)
    elif name == "empty_groups":  # adapters 1, 3, 4 get no tokens
        layout = hk.AdapterLayout([3, 16, 1, 7, 5])
        ids = torch.tensor([0, 2, -1, 2, 0, 0, -1, 2, 2, 0, 2])
    elif name == "lengths":  # already grouped (is_sorted fast path), one empty group
        layout = hk.AdapterLayout([1, 3, 7, 16])
        ids = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 0, 7, 3]))
    elif name == "all_unrouted":
        layout = hk.AdapterLayout([2, 5])
        ids = torch.full((9,), -1)
    elif name == "T0":
        layout = hk.AdapterLayout([1, 3, 7, 16])
        ids = torch.zeros(0, dtype=torch.int64)
    else:
        raise ValueError(name)
    if name == "lengths":
        groups = hk.TokenGroups.from_lengths([5, 0, 7, 3])
    else:
        groups = hk.TokenGroups.from_adapter_ids(ids, layout.num_adapters)
    T, R = ids.shape[0], layout.total_rank
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    A = (torch.randn(R, d_in, generator=gen) / d_in**0.5).to(dtype)
    B = torch.randn(R, d_out, generator=gen).to(dtype)
    return x.to(device), A.to(device), B.to(device), layout, groups.to(device), ids.to(device)


CASES = ["mixed", "empty_groups", "lengths", "all_unrouted", "T0"]


def _scaling(kind: str, layout, device):
    if kind == "float":
        return 0.75
    return torch.linspace(0.5, 2.0, layout.num_adapters, device=device)


# ------------------------------------------------------------------------------------------
# lora_delta / lora_linear on CPU tensors
# ------------------------------------------------------------------------------------------
def _check_delta_and_grads(case, dtype, scaling_kind, device):
    x, A, B, layout, groups, ids = make_case(case, dtype, device)
    scaling = _scaling(scaling_kind, layout, device)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with hk.use_backend("cuda"):
        assert dispatch.resolve("lora_delta", x.device)[0] == "cuda"
        y = hk.lora_delta(x, A, B, layout, groups, scaling)
    assert y.shape == (x.shape[0], B.shape[1]) and y.dtype == dtype and y.device == x.device
    xd, Ad, Bd = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    ref = dense_delta(xd, Ad, Bd, layout, ids, scaling)
    assert rel_err(y, ref) < TOL[dtype]
    if case in ("all_unrouted", "T0"):
        assert torch.equal(y, torch.zeros_like(y))
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
    gx, gA, gB = torch.autograd.grad(y, (x, A, B), dy)
    rx, rA, rB = torch.autograd.grad(ref, (xd, Ad, Bd), dy.double())
    for name, got, want in (("dx", gx, rx), ("dA", gA, rA), ("dB", gB, rB)):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert rel_err(got, want) < TOL[dtype], f"{name}: {rel_err(got, want)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_lora_delta_forward_backward_cpu(case, dtype):
    _check_delta_and_grads(case, dtype, "tensor" if case != "lengths" else "float", "cpu")


@pytest.mark.parametrize("scaling_kind", ["float", "tensor"])
def test_lora_delta_scaling_kinds_cpu(scaling_kind):
    _check_delta_and_grads("mixed", torch.float32, scaling_kind, "cpu")


def test_lora_linear_cpu():
    x, A, B, layout, groups, ids = make_case("mixed", torch.float32)
    weight = torch.randn(B.shape[1], x.shape[1])
    bias = torch.randn(B.shape[1])
    with hk.use_backend("cuda"):
        y = hk.lora_linear(x, weight, bias, A, B, layout, groups, 0.5)
    ref = x.double() @ weight.double().t() + bias.double() + dense_delta(x, A, B, layout, ids, 0.5)
    assert rel_err(y, ref) < 1e-5


def test_matches_torch_backend_cpu():
    x, A, B, layout, groups, _ = make_case("mixed", torch.float32, seed=3)
    outs = {}
    for be in ("torch", "cuda"):
        xi, Ai, Bi = (t.clone().requires_grad_(True) for t in (x, A, B))
        with hk.use_backend(be):
            y = hk.lora_delta(xi, Ai, Bi, layout, groups, 2.0)
        y.square().sum().backward()
        outs[be] = (y, xi.grad, Ai.grad, Bi.grad)
    for a, b in zip(outs["cuda"], outs["torch"]):
        assert rel_err(a, b) < 1e-5


def test_noncontiguous_inputs_cpu():
    x, A, B, layout, groups, ids = make_case("mixed", torch.float32)
    xn = torch.stack([x, x], dim=2)[..., 0]  # same values, column stride 2
    An = A.t().contiguous().t()  # column-major view
    Bn = torch.stack([B, B], dim=1)[:, 0]  # row stride 2 * d_out
    assert not (xn.is_contiguous() or An.is_contiguous() or Bn.is_contiguous())
    with hk.use_backend("cuda"):
        y = hk.lora_delta(xn, An, Bn, layout, groups, 1.5)
        y_ref = hk.lora_delta(x, A, B, layout, groups, 1.5)
    assert torch.equal(y, y_ref)


def _fwd_bwd(x, A, B, layout, groups, scaling):
    xi, Ai, Bi = (t.clone().requires_grad_(True) for t in (x, A, B))
    with hk.use_backend("cuda"):
        y = hk.lora_delta(xi, Ai, Bi, layout, groups, scaling)
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    return (y, *torch.autograd.grad(y, (xi, Ai, Bi), dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_reruns_and_thread_counts_cpu(dtype):
    x, A, B, layout, groups, _ = make_case("mixed", dtype, d_in=300, d_out=260)
    s = torch.rand(layout.num_adapters)
    first = _fwd_bwd(x, A, B, layout, groups, s)
    again = _fwd_bwd(x, A, B, layout, groups, s)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _fwd_bwd(x, A, B, layout, groups, s)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_larger_shape_parallel_cpu():
    """Enough tokens and columns for several parallel_for chunks and column blocks."""
    layout = hk.AdapterLayout([16, 1, 9, 64, 3, 7])
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, layout.num_adapters, (700,), generator=gen)
    groups = hk.TokenGroups.from_adapter_ids(ids, layout.num_adapters)
    x = torch.randn(700, 520, generator=gen)
    A = torch.randn(layout.total_rank, 520, generator=gen) / 520**0.5
    B = torch.randn(layout.total_rank, 300, generator=gen)
    y, gx, gA, gB = _fwd_bwd(x, A, B, layout, groups, 0.5)
    xd, Ad, Bd = (t.double().requires_grad_(True) for t in (x, A, B))
    ref = dense_delta(xd, Ad, Bd, layout, ids, 0.5)
    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    rx, rA, rB = torch.autograd.grad(ref, (xd, Ad, Bd), dy.double())
    for got, want in ((y, ref), (gx, rx), (gA, rA), (gB, rB)):
        assert rel_err(got, want) < 1e-4


# ------------------------------------------------------------------------------------------
# the blocked C++ CPU kernels: odd shapes, instruction-set variants, thread counts
# ------------------------------------------------------------------------------------------
def _blocked_case(dtype, T=300, d_in=1037, d_out=263, seed=11):
    """Segments longer than a work item (64 tokens), an empty one, -1 tokens, ranks 1..67
    (remainders of every register tile), widths that are no multiple of any vector."""
    layout = hk.AdapterLayout([1, 67, 5, 13, 2, 9])
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.03, 0.2, 0.5, 0.0, 0.02, 0.2, 0.05])  # -1, then adapters 0..5 (adapter 2 empty)
    ids = torch.multinomial(p, T, replacement=True, generator=gen) - 1
    groups = hk.TokenGroups.from_adapter_ids(ids, layout.num_adapters)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    A = (torch.randn(layout.total_rank, d_in, generator=gen) / d_in**0.5).to(dtype)
    B = torch.randn(layout.total_rank, d_out, generator=gen).to(dtype)
    return x, A, B, layout, groups, ids


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_blocked_kernels_thread_counts_and_reference_cpu(dtype):
    x, A, B, layout, groups, ids = _blocked_case(dtype)
    s = torch.linspace(0.5, 2.0, layout.num_adapters, dtype=torch.float64 if dtype == torch.float64 else None)
    runs = [_with_threads(n, lambda: _fwd_bwd(x, A, B, layout, groups, s)) for n in (1, 2, 3)]
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)
    xd, Ad, Bd = (t.double().requires_grad_(True) for t in (x, A, B))
    ref = dense_delta(xd, Ad, Bd, layout, ids, s)
    dy = torch.linspace(-1, 1, ref.numel()).reshape(ref.shape).to(dtype).double()
    want = (ref, *torch.autograd.grad(ref, (xd, Ad, Bd), dy))
    for name, got, w in zip(("y", "dx", "dA", "dB"), runs[0], want):
        assert rel_err(got, w) < TOL[dtype], name


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_instruction_set_variants_cpu(isa, monkeypatch):
    """HETLORA_CPU_ISA caps the kernel variant (the widest one the CPU has is the default);
    every variant is correct and thread-count independent."""
    if isa != "native":
        monkeypatch.setenv("HETLORA_CPU_ISA", isa)
    x, A, B, layout, groups, ids = _blocked_case(torch.float32, T=150, d_in=301, d_out=77)
    runs = [_with_threads(n, lambda: _fwd_bwd(x, A, B, layout, groups, 0.75)) for n in (1, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    xd, Ad, Bd = (t.double().requires_grad_(True) for t in (x, A, B))
    ref = dense_delta(xd, Ad, Bd, layout, ids, 0.75)
    dy = torch.linspace(-1, 1, ref.numel()).reshape(ref.shape).double()
    want = (ref, *torch.autograd.grad(ref, (xd, Ad, Bd), dy))
    for got, w in zip(runs[0], want):
        assert rel_err(got, w) < 1e-5


@pytest.mark.parametrize("d_in, d_out", [(1, 1), (16, 32), (33, 5), (256, 512), (7, 300)])
def test_primitives_odd_widths_cpu(d_in, d_out):
    """shrink/expand/wgrad one by one against float64, zeros past r_k and on -1 rows."""
    ranks = [1, 4, 0, 19, 8]  # rank 0 reaches _C only through its own offsets (AdapterLayout refuses it)
    offs = [0, 1, 5, 5, 24, 32]
    K, r_max, R = len(ranks), max(ranks), offs[-1]
    gen = torch.Generator().manual_seed(d_in * 1000 + d_out)
    ids = torch.randint(-1, K, (90,), generator=gen)
    groups = hk.TokenGroups.from_adapter_ids(ids, K)
    order, starts, base = groups.order, groups.starts, groups.starts_list[0]
    offsets = torch.tensor(offs)
    x = torch.randn(90, d_in, generator=gen)
    A = torch.randn(R, d_in, generator=gen)
    B = torch.randn(R, d_out, generator=gen)
    s = torch.rand(K, generator=gen) + 0.5
    h = _C().shrink(x, A, order, starts, offsets, s, 1.0, base, r_max)
    y = _C().expand(h, B, order, starts, offsets, None, 2.0, base)
    dB = _C().wgrad(h, y, order, starts, offsets, s, 1.0, R)
    h_ref = torch.zeros(90, r_max, dtype=torch.float64)
    y_ref = torch.zeros(90, d_out, dtype=torch.float64)
    dB_ref = torch.zeros(R, d_out, dtype=torch.float64)
    for k in range(K):
        rows, m = slice(offs[k], offs[k + 1]), ids == k
        h_ref[m, : ranks[k]] = float(s[k]) * x[m].double() @ A[rows].double().t()
        y_ref[m] = 2.0 * h_ref[m, : ranks[k]] @ B[rows].double()
        dB_ref[rows] = float(s[k]) * h[m, : ranks[k]].double().t() @ y[m].double()
    assert torch.equal(h[ids == -1], torch.zeros_like(h[ids == -1]))
    assert torch.equal(y[ids == -1], torch.zeros_like(y[ids == -1]))
    for k in range(K):  # exact zeros past each token's rank (all of them for the rank-0 adapter)
        assert not h[ids == k, ranks[k] :].any()
    for got, want in ((h, h_ref), (y, y_ref), (dB, dB_ref)):
        assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------------------------------
# server ops on CPU tensors
# ------------------------------------------------------------------------------------------
def _layers(dtype, device="cpu", seed=0):
    layout = hk.AdapterLayout([1, 3, 7, 16, 5])
    gen = torch.Generator().manual_seed(seed)
    dims = [(40, 24), (17, 33), (64, 8)]
    As = [torch.randn(layout.total_rank, di, generator=gen).to(device=device, dtype=dtype) for di, _ in dims]
    Bs = [torch.randn(layout.total_rank, do, generator=gen).to(device=device, dtype=dtype) for _, do in dims]
    As[0][layout.offsets[1]] = 0  # a zero component: its norm and gradient are 0
    return layout, As, Bs


def dense_component_norms(A, B, layout):
    out = torch.zeros(layout.num_adapters, layout.max_rank, dtype=torch.float64)
    for k in range(layout.num_adapters):
        rows = layout.rows(k)
        out[k, : layout.ranks[k]] = A[rows].double().norm(dim=1) * B[rows].double().norm(dim=1)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_component_norms_cpu(dtype):
    layout, As, Bs = _layers(dtype)
    with hk.use_backend("cuda"):
        one = hk.component_norms(As[0], Bs[0], layout)
        many = hk.component_norms(As, Bs, layout)
        summed = hk.component_norms(As, Bs, layout, reduce="sum")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert one.shape == (layout.num_adapters, layout.max_rank) and one.dtype == acc
    refs = [dense_component_norms(A, B, layout) for A, B in zip(As, Bs)]
    assert rel_err(one, refs[0]) < TOL[dtype] / 10 + 1e-6
    assert many.shape == (3, layout.num_adapters, layout.max_rank)
    for i, ref in enumerate(refs):
        assert rel_err(many[i], ref) < TOL[dtype] / 10 + 1e-6
    assert rel_err(summed, sum(refs)) < TOL[dtype] / 10 + 1e-6


def test_component_norms_gradcheck_cpu():
    layout, As, Bs = _layers(torch.float64)
    A = As[0].clone().requires_grad_(True)
    B = Bs[0].clone().requires_grad_(True)

    def f(a, b):
        with hk.use_backend("cuda"):
            return hk.component_norms(a, b, layout)

    # the zeroed component's gradient is 0 in both (subgradient), finite differences agree off it
    A2 = A.detach().clone()
    A2[layout.offsets[1]] = 0.1
    assert torch.autograd.gradcheck(f, (A2.requires_grad_(True), B), eps=1e-6, atol=1e-6)
    out = f(A, B)
    g = torch.randn_like(out)
    gA, gB = torch.autograd.grad(out, (A, B), g)
    Ar = A.detach().clone().requires_grad_(True)
    Br = B.detach().clone().requires_grad_(True)
    with hk.use_backend("torch"):
        rA, rB = torch.autograd.grad(hk.component_norms(Ar, Br, layout), (Ar, Br), g)
    assert rel_err(gA, rA) < 1e-12 and rel_err(gB, rB) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_fro_norms_cpu(dtype):
    layout, As, Bs = _layers(dtype)
    s = torch.linspace(-1.0, 2.0, layout.num_adapters)
    with hk.use_backend("cuda"):
        got = hk.delta_fro_norms(As, Bs, layout, s)
        got1 = hk.delta_fro_norms(As[1], Bs[1], layout)
    for i, (A, B) in enumerate(zip(As, Bs)):
        ref = torch.stack(
            [
                abs(float(s[k])) * (B[layout.rows(k)].double().t() @ A[layout.rows(k)].double()).norm()
                for k in range(layout.num_adapters)
            ]
        )
        assert rel_err(got[i], ref) < TOL[dtype] / 10 + 1e-6
    ref1 = torch.stack(
        [
            (Bs[1][layout.rows(k)].double().t() @ As[1][layout.rows(k)].double()).norm()
            for k in range(layout.num_adapters)
        ]
    )
    assert got1.shape == (layout.num_adapters,) and rel_err(got1, ref1) < TOL[dtype] / 10 + 1e-6


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_fro_sq_odd_shapes_and_thread_counts_cpu(dtype, isa, monkeypatch):
    """The register-tiled Gram kernel of delta_fro_sq: ranks 1, 2, 3, 17, 33, 64 (every tile
    remainder) and an empty adapter (through its offsets: AdapterLayout refuses rank 0), widths 0,
    1, 7, 33, 1000 and 2500 (no multiple of any vector, more than one column chunk) across the
    layers of one call.  Bitwise the same for 1, 2 and 3 threads, and per adapter within float
    rounding of a float64 ||B_k^T A_k||_F^2 of the same (rounded) inputs, for every kernel variant."""
    if isa != "native":
        monkeypatch.setenv("HETLORA_CPU_ISA", isa)
    ranks = [1, 3, 0, 17, 33, 64, 2]
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    dims = [(1, 7), (7, 1000), (2500, 1), (33, 0)]
    gen = torch.Generator().manual_seed(23)
    As = [torch.randn(offs[-1], di, generator=gen).to(dtype) for di, _ in dims]
    Bs = [torch.randn(offs[-1], do, generator=gen).to(dtype) for _, do in dims]
    offsets = torch.tensor(offs)
    runs = [_with_threads(n, lambda: _C().delta_fro_sq(As, Bs, offsets, max(ranks))) for n in (1, 2, 3)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert runs[0].shape == (len(dims), len(ranks)) and runs[0].dtype == acc
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    ref = torch.tensor(
        [
            [float((B[a:b].double().t() @ A[a:b].double()).norm() ** 2) for a, b in zip(offs, offs[1:])]
            for A, B in zip(As, Bs)
        ],
        dtype=torch.float64,
    )
    assert not runs[0][:, ranks.index(0)].any() and not runs[0][3].any()  # empty adapter, zero-width layer
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(runs[0].double(), ref, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_aggregate_cpu(dtype):
    layout, As, Bs = _layers(dtype)
    w = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05], dtype=torch.float64)
    out_rank = 20
    with hk.use_backend("cuda"):
        gA, gB = hk.weighted_aggregate(As, Bs, layout, w, out_rank)
        one_A, one_B = hk.weighted_aggregate(As[2], Bs[2], layout, w)
    for i in range(3):
        for got, t in ((gA[i], As[i]), (gB[i], Bs[i])):
            ref = torch.zeros(out_rank, t.shape[1], dtype=torch.float64)
            for k in range(layout.num_adapters):
                ref[: layout.ranks[k]] += w[k] * t[layout.rows(k)].double()
            assert got.shape == ref.shape and got.dtype == dtype
            assert rel_err(got, ref) < TOL[dtype]
            assert torch.equal(got[layout.max_rank :], torch.zeros_like(got[layout.max_rank :]))
    assert one_A.shape == (layout.max_rank, As[2].shape[1]) and one_B.shape == (layout.max_rank, Bs[2].shape[1])
    assert torch.equal(one_A, gA[2][: layout.max_rank])


def test_server_ops_mixed_dtype_layers_cpu():
    """Layers of different dtypes cannot share one call: they run one call per layer."""
    layout, As, Bs = _layers(torch.float32)
    As[1], Bs[1] = As[1].double(), Bs[1].double()
    w = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05], dtype=torch.float64)
    results = {}
    for be in ("torch", "cuda"):
        with hk.use_backend(be):
            results[be] = (
                hk.component_norms(As, Bs, layout),
                hk.delta_fro_norms(As, Bs, layout),
                *hk.weighted_aggregate(As, Bs, layout, w, 16),
            )
    got, want = results["cuda"], results["torch"]
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6
    for g, r in zip(got[2] + got[3], want[2] + want[3]):
        assert g.dtype == r.dtype and rel_err(g, r) < 1e-6


def test_component_norms_list_gradients_cpu():
    layout, As, Bs = _layers(torch.float64)
    As = [a.clone().requires_grad_(True) for a in As]
    Bs = [b.clone().requires_grad_(True) for b in Bs]
    g = torch.randn(3, layout.num_adapters, layout.max_rank, dtype=torch.float64)
    grads = {}
    for be in ("torch", "cuda"):
        with hk.use_backend(be):
            out = hk.component_norms(As, Bs, layout)
        grads[be] = torch.autograd.grad(out, [*As, Bs[1]], g)  # B[0], B[2] not asked for
    for a, b in zip(grads["cuda"], grads["torch"]):
        assert rel_err(a, b) < 1e-12


def test_weighted_aggregate_rejects_nonfinite_client():
    layout, As, Bs = _layers(torch.float32)
    As[0][layout.offsets[3] + 2, 5] = float("nan")
    with hk.use_backend("cuda"), pytest.raises(ValueError, match="adapter 3"):
        hk.weighted_aggregate(As[0], Bs[0], layout, [0.2] * 5)


def test_truncate_cpu():
    A_g, B_g = torch.randn(16, 12), torch.randn(16, 9)
    with hk.use_backend("cuda"):
        A, B, layout = hk.truncate(A_g, B_g, [3, 16, 1])
    assert torch.equal(A, torch.cat([A_g[:3], A_g[:16], A_g[:1]]))
    assert torch.equal(B, torch.cat([B_g[:3], B_g[:16], B_g[:1]]))
    assert layout.ranks == (3, 16, 1)


# ------------------------------------------------------------------------------------------
# availability, dispatch and bad inputs
# ------------------------------------------------------------------------------------------
def test_available_and_dispatch():
    assert cuda_backend.available("cpu") == (True, "")
    assert hk.backend_status("cuda", "cpu") == (True, "")
    ok, why = cuda_backend.available("cuda")
    assert ok == bool(_C().with_cuda()), why
    if not ok:
        assert "without its CUDA kernels" in why
    assert cuda_backend.available("meta")[0] is False
    assert set(cuda_backend.IMPLS) >= {"lora_delta", "lora_linear", "component_norms", "weighted_aggregate"}


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_cpu_auto_table(threads):
    W = dispatch.LoraWork
    choice = dispatch.cpu_auto_choice
    assert choice("component_norms") == choice("weighted_aggregate") == choice("delta_fro_norms") == "cuda"
    assert choice("truncate") == "torch"
    f32 = torch.float32
    for n in (1, 2, 4):
        threads(n)
        # interleaved tokens: the torch path pays a gather and a scatter
        assert choice("lora_delta", W(4096, 32, False, f32)) == "cuda"
        assert choice("lora_linear", W(64, 8, False, torch.bfloat16)) == "cuda"
        # one adapter: one MKL GEMM pair
        assert choice("lora_delta", W(256, 1, True, f32)) == "torch"
        assert choice("lora_delta", W(256, 1, False, f32)) == "torch"
        # few tokens per adapter, grouped: C++; many: torch
        assert choice("lora_delta", W(1024, 32, True, f32)) == "cuda"
        assert choice("lora_delta", W(4096, 8, True, f32)) == "torch"
        assert choice("lora_delta", W(4096, 32, False, torch.float64)) == "torch"
        assert choice("lora_delta") == "torch"  # nothing known of the call
    threads(1)
    assert choice("lora_delta", W(4096, 32, True, f32)) == "torch"  # 128 per adapter, 1 thread
    threads(2)
    assert choice("lora_delta", W(4096, 32, True, f32)) == "cuda"


def test_cuda_auto_order_follows_the_gpu_sweep(monkeypatch):
    """On CUDA tensors auto tries, per op, the order the GPU sweeps measured; an unavailable
    backend is skipped (no GPU needed: the backends are stand-ins that report availability)."""
    import types

    order = dispatch.cuda_auto_order
    assert order("lora_delta") == order("lora_linear") == ("triton", "cuda", "torch")
    assert order("component_norms") == order("weighted_aggregate") == order("delta_fro_norms") == (
        "cuda", "triton", "torch")
    assert order("truncate") == ("torch",)
    W, bf16 = dispatch.LoraWork, torch.bfloat16
    # one adapter over grouped tokens: torch (measured faster); interleaved, -1 tokens or more adapters: triton
    assert order("lora_linear", W(4096, 1, True, bf16)) == order("lora_delta", W(64, 0, True, bf16)) == ("torch",)
    assert order("lora_delta", W(4096, 1, False, bf16))[0] == "triton"
    assert order("lora_delta", W(4096, 2, True, bf16))[0] == "triton"
    assert order("component_norms", W(4096, 1, True, bf16))[0] == "cuda"  # only the LoRA ops look at the work
    up = {"triton": True, "cuda": True}

    def fake(name):
        impls = {op: (lambda *a, _n=name: _n) for op in dispatch.reference.IMPLS}
        return types.SimpleNamespace(IMPLS=impls, available=lambda dev, _n=name: (up[_n], "" if up[_n] else "off"))

    monkeypatch.setitem(dispatch._loaded, "triton", fake("triton"))
    monkeypatch.setitem(dispatch._loaded, "cuda", fake("cuda"))
    cuda = torch.device("cuda")
    with hk.use_backend("auto"):
        assert dispatch.resolve("lora_linear", cuda)[0] == "triton"
        assert dispatch.resolve("lora_linear", cuda, W(256, 1, True, bf16))[0] == "torch"
        assert dispatch.resolve("lora_linear", cuda, W(256, 8, True, bf16))[0] == "triton"
        assert dispatch.resolve("component_norms", cuda)[0] == "cuda"
        assert dispatch.resolve("weighted_aggregate", cuda)[0] == "cuda"
        assert dispatch.resolve("delta_fro_norms", cuda)[0] == "cuda"
        assert dispatch.resolve("truncate", cuda)[0] == "torch"
        up["cuda"] = False  # e.g. _C built without its CUDA kernels
        assert dispatch.resolve("component_norms", cuda)[0] == "triton"
        up["triton"] = False
        assert dispatch.resolve("lora_linear", cuda)[0] == "torch"


def test_cpu_auto_follows_the_table_and_matches_the_chosen_backend():
    K, d = 8, 40
    layout = hk.AdapterLayout([3, 7, 1, 16, 5, 2, 9, 4])
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(96, d, generator=gen)
    A = torch.randn(layout.total_rank, d, generator=gen)
    B = torch.randn(layout.total_rank, d, generator=gen)
    grouped_ids = torch.arange(K).repeat_interleave(12)
    for ids, want in ((grouped_ids[torch.randperm(96, generator=gen)], "cuda"), (grouped_ids, "cuda"),
                      (torch.zeros(96, dtype=torch.long), "torch")):
        groups = hk.TokenGroups.from_adapter_ids(ids, K)
        work = dispatch.LoraWork(groups.num_routed, groups.num_active, groups.is_sorted, x.dtype)
        assert dispatch.resolve("lora_delta", x.device, work)[0] == want
        y = hk.lora_delta(x, A, B, layout, groups, 0.5)  # auto
        with hk.use_backend(want):
            assert torch.equal(y, hk.lora_delta(x, A, B, layout, groups, 0.5))
    assert dispatch.resolve("weighted_aggregate", x.device)[0] == "cuda"
    assert dispatch.resolve("delta_fro_norms", x.device)[0] == "cuda"
    assert dispatch.resolve("truncate", x.device)[0] == "torch"


def test_cpu_auto_falls_back_to_torch_without_the_extension(monkeypatch):
    monkeypatch.setattr(cuda_backend, "available", lambda device: (False, "the extension is not built"))
    work = dispatch.LoraWork(64, 8, False, torch.float32)
    assert dispatch.resolve("lora_delta", torch.device("cpu"), work)[0] == "torch"
    assert dispatch.resolve("component_norms", torch.device("cpu"))[0] == "torch"


def test_public_api_bad_inputs_name_the_argument():
    x, A, B, layout, groups, _ = make_case("mixed", torch.float32)
    with hk.use_backend("cuda"):
        with pytest.raises(ValueError, match="x has d_in"):
            hk.lora_delta(x[:, :5], A, B, layout, groups, 1.0)
        with pytest.raises(ValueError, match="groups cover"):
            hk.lora_delta(x[:10], A, B, layout, groups, 1.0)
        with pytest.raises(ValueError, match="scaling"):
            hk.lora_delta(x, A, B, layout, groups, torch.ones(2))
        with pytest.raises(TypeError, match="B dtype"):
            hk.lora_delta(x, A, B.double(), layout, groups, 1.0)
        with pytest.raises(ValueError, match="out_rank"):
            hk.weighted_aggregate(A, B, layout, [0.25] * 4, out_rank=3)


def _meta_args(T=6, d=8):
    x = torch.randn(T, d)
    w = torch.randn(4, d)
    order = torch.arange(T)
    starts = torch.tensor([0, 2, T])
    offsets = torch.tensor([0, 1, 4])
    return x, w, order, starts, offsets


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: {**a, "w": a["w"][:, :5]}, ValueError, "w has 5 columns"),
        (lambda a: {**a, "x": a["x"][0]}, ValueError, "x must be 2-D"),
        (lambda a: {**a, "x": a["x"].int()}, TypeError, "x must be float32"),
        (lambda a: {**a, "w": a["w"].double()}, TypeError, "w dtype"),
        (lambda a: {**a, "order": a["order"].int()}, TypeError, "order must be int64"),
        (lambda a: {**a, "order": a["order"][:3]}, ValueError, "order must be 1-D"),
        (lambda a: {**a, "order": a["order"] + 100}, ValueError, r"order\[0\] = 100"),
        (lambda a: {**a, "starts": torch.tensor([0, 6])}, ValueError, "starts must be 1-D"),
        (lambda a: {**a, "starts": torch.tensor([0, 7, 6])}, ValueError, "starts must be non-decreasing"),
        (lambda a: {**a, "base": 1}, ValueError, "base"),
        (lambda a: {**a, "r_max": 2}, ValueError, r"offsets give adapter 1 rank 3, outside \[0, r_max=2\]"),
        (lambda a: {**a, "offsets": torch.tensor([0, 1, 3])}, ValueError, r"offsets\[K\]"),
        (lambda a: {**a, "scales": torch.ones(3)}, ValueError, "scales must be"),
        (lambda a: {**a, "x": a["x"].to("meta")}, ValueError, "x must be a CPU or CUDA tensor"),
    ],
)
def test_C_shrink_checks_name_the_argument(mutate, exc, match):
    x, w, order, starts, offsets = _meta_args()
    args = dict(x=x, w=w, order=order, starts=starts, offsets=offsets, scales=None, scale=1.0, base=0, r_max=3)
    args = mutate(args)
    with pytest.raises(exc, match=match):
        _C().shrink(**args)


def test_C_other_ops_check_arguments():
    x, w, order, starts, offsets = _meta_args()
    h = _C().shrink(x, w, order, starts, offsets, None, 1.0, 0, 3)
    assert h.shape == (6, 3) and h.dtype == torch.float32
    with pytest.raises(TypeError, match="h must be torch.float32"):
        _C().expand(h.double(), w, order, starts, offsets, None, 1.0, 0)
    with pytest.raises(ValueError, match="h must be 2-D"):
        _C().wgrad(h[:3], x, order, starts, offsets, None, 1.0, 4)
    with pytest.raises(ValueError, match=r"B\[0\] has 3 rows but A\[0\] has 4"):
        _C().component_norms([w], [w[:3]], offsets, 3)
    with pytest.raises(ValueError, match=r"A\[1\] has 3 rows"):
        _C().delta_fro_sq([w, w[:3]], [w, w], offsets, 3)
    with pytest.raises(TypeError, match=r"A\[1\] dtype torch.float64 differs from A\[0\]"):
        _C().component_norms([w, w.double()], [w, w], offsets, 3)
    with pytest.raises(ValueError, match="A has 2 layers but B has 1"):
        _C().component_norms([w, w], [w], offsets, 3)
    with pytest.raises(ValueError, match="A must hold at least one layer"):
        _C().delta_fro_sq([], [], offsets, 3)
    with pytest.raises(ValueError, match="weights must be"):
        _C().weighted_aggregate([w], offsets, torch.ones(3), 3)
    with pytest.raises(ValueError, match="offsets give adapter 1 rank 3"):
        _C().weighted_aggregate([w], offsets, torch.ones(2), 2)
    if not _C().with_cuda() and torch.cuda.is_available():  # pragma: no cover - CUDA machine, CPU-only build
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            _C().shrink(x.cuda(), w.cuda(), order.cuda(), starts.cuda(), offsets.cuda(), None, 1.0, 0, 3)


# ------------------------------------------------------------------------------------------
# the build: a failed or skipped extension never fails the install
# ------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def _setup_copy(tmp_path: Path, break_sources: bool) -> Path:
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    if break_sources:  # a missing header stops every compile at once
        for f in [tmp_path / "csrc" / "bindings.cpp", *(tmp_path / "csrc" / "cpu").glob("*.cpp")]:
            f.write_text("#include <hetlora_test_missing_header.h>\n" + f.read_text())
    return tmp_path


def _run_setup(cwd: Path, **env) -> subprocess.CompletedProcess:
    # run from another directory, as pip may: setup.py must find csrc/ by its own path
    return subprocess.run(
        [sys.executable, str(cwd / "setup.py"), "-q", "build_ext", "--inplace"],
        cwd=cwd / "csrc",
        env={**os.environ, "MAX_JOBS": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_failed_build_still_succeeds_and_says_why(tmp_path):
    res = _run_setup(_setup_copy(tmp_path, break_sources=True))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "building the C++/CUDA extension hetlora_kernels._C failed" in res.stderr
    assert "backend work" in res.stderr.replace("\n", " ") and "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("_C*.so"))


def test_skipped_build_says_why(tmp_path):
    res = _run_setup(_setup_copy(tmp_path, break_sources=False), HETLORA_SKIP_EXT="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HETLORA_SKIP_EXT is set" in res.stderr
    assert not list(tmp_path.rglob("_C*.so"))


@pytest.mark.slow
def test_jit_build_matches_installed(tmp_path):
    """The developers' JIT path compiles the same sources (about a minute on 2 cores)."""
    installed = cuda_backend.extension()
    try:
        jit = cuda_backend.build_jit(build_directory=tmp_path)
        x, w, order, starts, offsets = _meta_args()
        assert torch.equal(
            jit.shrink(x, w, order, starts, offsets, None, 1.0, 0, 3),
            installed.shrink(x, w, order, starts, offsets, None, 1.0, 0, 3),
        )
    finally:
        cuda_backend._C = installed


# ------------------------------------------------------------------------------------------
# CUDA kernels (run only on a machine with a GPU and a CUDA build of _C)
# ------------------------------------------------------------------------------------------
def _need_cuda_kernels():
    ok, why = cuda_backend.available("cuda")
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_lora_delta_forward_backward_gpu(case, dtype):
    _need_cuda_kernels()
    _check_delta_and_grads(case, dtype, "tensor", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_and_matches_cpu_gpu(dtype):
    _need_cuda_kernels()
    x, A, B, layout, groups, ids = make_case("mixed", dtype, d_in=1000, d_out=700)
    s = torch.rand(layout.num_adapters)
    gpu = [_fwd_bwd(x.cuda(), A.cuda(), B.cuda(), layout, groups.to("cuda"), s.cuda()) for _ in range(2)]
    for a, b in zip(*gpu):
        assert torch.equal(a, b)
    cpu = _fwd_bwd(x, A, B, layout, groups, s)
    for a, c in zip(gpu[0], cpu):
        assert rel_err(a.cpu(), c) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_server_ops_gpu(dtype):
    _need_cuda_kernels()
    layout, As, Bs = _layers(dtype, "cuda")
    w = torch.tensor([0.1, 0.4, 0.2, 0.25, 0.05], dtype=torch.float64)
    with hk.use_backend("cuda"):
        norms = hk.component_norms(As, Bs, layout).cpu()
        fro = hk.delta_fro_norms(As, Bs, layout).cpu()
        gA, gB = hk.weighted_aggregate(As, Bs, layout, w, 20)
    with hk.use_backend("torch"):
        r_norms = hk.component_norms([a.cpu() for a in As], [b.cpu() for b in Bs], layout)
        r_fro = hk.delta_fro_norms([a.cpu().double() for a in As], [b.cpu().double() for b in Bs], layout)
        rA, rB = hk.weighted_aggregate([a.cpu().double() for a in As], [b.cpu().double() for b in Bs], layout, w, 20)
    assert rel_err(norms, r_norms) < TOL[dtype]
    assert rel_err(fro, r_fro) < TOL[dtype]
    for got, want in zip(gA + gB, rA + rB):
        assert rel_err(got.cpu(), want) < TOL[dtype]
