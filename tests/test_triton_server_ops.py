"""Triton server-side ops (component_norms, delta_fro_norms, weighted_aggregate, truncate).

Run under ``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py) on small seeded shapes; every
result is checked against float64 references written here (explicit loops, dense per-client
``ΔW`` for the Frobenius norms), never against the project's own ops.
"""

from __future__ import annotations

import pytest
import torch

import hetlora_kernels as hk
from hetlora_kernels import dispatch

from .helpers import rel_err

ok, why = hk.backend_status("triton", "cuda" if torch.cuda.is_available() else "cpu")
if not ok:
    pytest.skip(f"triton backend unavailable: {why}", allow_module_level=True)

from hetlora_kernels.triton import server_ops  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RANKS = [3, 1, 6, 4]  # a rank-1 client and one at r_max = 6
WIDTHS = [(12, 9), (20, 33), (7, 16)]  # (d_in, d_out) per layer: widths differ
# relative Frobenius error vs float64 (DESIGN.md section 5; fp32 Grams use IEEE dots, not tf32)
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_layers(ranks, widths, dtype, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    R = sum(ranks) if rows is None else rows
    As = [torch.randn(R, di, generator=g).to(dtype).to(DEV) for di, _ in widths]
    Bs = [torch.randn(R, do, generator=g).to(dtype).to(DEV) for _, do in widths]
    return As, Bs


def offsets(ranks):
    off = [0]
    for r in ranks:
        off.append(off[-1] + r)
    return off


# ------------------------------------------------------------------------------------------
# float64 references (loops; dense ΔW)
# ------------------------------------------------------------------------------------------
def ref_component_norms(A, B, ranks):
    A, B = A.double().cpu(), B.double().cpu()
    off = offsets(ranks)
    out = torch.zeros(len(ranks), max(ranks), dtype=torch.float64)
    for k, r in enumerate(ranks):
        for j in range(r):
            out[k, j] = A[off[k] + j].norm() * B[off[k] + j].norm()
    return out


def ref_delta_fro(A, B, ranks, scaling):
    A, B = A.double().cpu(), B.double().cpu()
    off = offsets(ranks)
    s = [scaling] * len(ranks) if isinstance(scaling, float) else [float(v) for v in scaling]
    out = torch.zeros(len(ranks), dtype=torch.float64)
    for k in range(len(ranks)):
        rows = slice(off[k], off[k + 1])
        out[k] = (s[k] * B[rows].t() @ A[rows]).norm()  # dense [d_out, d_in]
    return out


def ref_aggregate(T, ranks, w, out_rank):
    T = T.double().cpu()
    off = offsets(ranks)
    g = torch.zeros(out_rank, T.shape[1], dtype=torch.float64)
    for k, r in enumerate(ranks):
        for j in range(r):
            g[j] += float(w[k]) * T[off[k] + j]
    return g


def ref_truncate(T, ranks):
    return torch.cat([T[:r].double().cpu() for r in ranks])


def _triton_impl(op):
    name, fn = dispatch.resolve(op, DEV)
    assert name == "triton" and fn is server_ops.IMPLS[op]
    return fn


# ------------------------------------------------------------------------------------------
# values vs float64
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_component_norms_matches_float64(dtype):
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, dtype, seed=1)
    with hk.use_backend("triton"):
        _triton_impl("component_norms")
        out = hk.component_norms(As, Bs, layout)
        summed = hk.component_norms(As, Bs, layout, reduce="sum")
        single = hk.component_norms(As[1], Bs[1], layout)
    assert out.shape == (len(WIDTHS), len(RANKS), max(RANKS)) and out.dtype == torch.float32
    refs = [ref_component_norms(a, b, RANKS) for a, b in zip(As, Bs)]
    for i, ref in enumerate(refs):
        assert rel_err(out[i].cpu(), ref) < TOL[dtype]
        for k, r in enumerate(RANKS):  # exactly 0 past r_k
            assert bool((out[i, k, r:] == 0).all())
    assert rel_err(summed.cpu(), sum(refs)) < TOL[dtype]
    assert single.shape == (len(RANKS), max(RANKS)) and rel_err(single.cpu(), refs[1]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [0.5, [2.0, -1.5, 0.25, 1.0]])
def test_delta_fro_norms_matches_dense(dtype, scaling):
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, dtype, seed=2)
    s = torch.tensor(scaling, dtype=torch.float32) if isinstance(scaling, list) else scaling
    with hk.use_backend("triton"):
        _triton_impl("delta_fro_norms")
        out = hk.delta_fro_norms(As, Bs, layout, s)
    assert out.shape == (len(WIDTHS), len(RANKS)) and out.dtype == torch.float32
    for i, (a, b) in enumerate(zip(As, Bs)):
        assert rel_err(out[i].cpu(), ref_delta_fro(a, b, RANKS, scaling)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_delta_fro_norms_gpu_tiles(monkeypatch, dtype):
    """The GPU's 16 x 16 Gram tiles, run here: ranks up to 40 give 3 x 3 tiles per adapter, of
    which those past r_k or below the diagonal must add nothing and those above it count twice."""
    assert server_ops.gram_block_t(64, interpret=False) == 16
    monkeypatch.setattr(server_ops, "gram_block_t", lambda max_rank: 16)
    ranks = [1, 40, 16, 17, 33]
    layout = hk.AdapterLayout(ranks)
    As, Bs = make_layers(ranks, [(24, 16), (9, 40)], dtype, seed=4)
    with hk.use_backend("triton"):
        _triton_impl("delta_fro_norms")
        out = hk.delta_fro_norms(As, Bs, layout, 0.5)
    tol = 1e-12 if dtype == torch.float64 else 1e-4  # rounded inputs: only the sums' rounding is left
    for i, (a, b) in enumerate(zip(As, Bs)):
        assert rel_err(out[i].cpu(), ref_delta_fro(a, b, ranks, 0.5)) < tol


def test_delta_fro_norms_large_rank_tiles():
    """r_max > 64: the Gram is tiled (off-diagonal tiles counted twice, lower ones skipped)."""
    ranks = [70, 2, 33]
    layout = hk.AdapterLayout(ranks)
    As, Bs = make_layers(ranks, [(24, 16)], torch.float32, seed=3)
    with hk.use_backend("triton"):
        out = hk.delta_fro_norms(As[0], Bs[0], layout, 2.0)
    assert rel_err(out.cpu(), ref_delta_fro(As[0], Bs[0], ranks, 2.0)) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", [[0.1, 0.4, 0.3, 0.2], [1.0, -2.5, 0.5, 1.0]])  # 2nd sums to 0
def test_weighted_aggregate_matches_float64(dtype, weights):
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, dtype, seed=4)
    w = torch.tensor(weights, dtype=torch.float64)
    out_rank = max(RANKS) + 2  # rows past every rank stay zero
    with hk.use_backend("triton"):
        _triton_impl("weighted_aggregate")
        Ag, Bg = hk.weighted_aggregate(As, Bs, layout, w, out_rank)
        Ag2, Bg2 = hk.weighted_aggregate(As, Bs, layout, w, out_rank)
    for i in range(len(WIDTHS)):
        for got, src in ((Ag[i], As[i]), (Bg[i], Bs[i])):
            assert got.dtype == dtype and got.shape == (out_rank, src.shape[1])
            assert rel_err(got.cpu(), ref_aggregate(src, RANKS, w, out_rank)) < TOL[dtype]
            assert bool((got[max(RANKS) :] == 0).all())
    # deterministic: bitwise the same on a second call
    assert all(torch.equal(x, y) for x, y in zip(Ag + Bg, Ag2 + Bg2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncate_gathers_leading_rows(dtype):
    g_rank = 7
    As, Bs = make_layers(RANKS, WIDTHS, dtype, seed=5, rows=g_rank)
    As[0] = As[0].t().contiguous().t()  # column-major: a non-contiguous input
    Bs[1] = torch.randn(g_rank, 2 * WIDTHS[1][1]).to(dtype).to(DEV)[:, ::2]  # strided columns
    with hk.use_backend("triton"):
        _triton_impl("truncate")
        A, B, layout = hk.truncate(As, Bs, RANKS)
    assert layout == hk.AdapterLayout(RANKS)
    for i in range(len(WIDTHS)):
        assert torch.equal(A[i].cpu().double(), ref_truncate(As[i], RANKS))
        assert torch.equal(B[i].cpu().double(), ref_truncate(Bs[i], RANKS))


def test_float64_runs_on_the_kernels():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, torch.float64, seed=6)
    w = torch.tensor([0.3, -0.2, 0.6, 0.3], dtype=torch.float64)
    with hk.use_backend("triton"):
        cn = hk.component_norms(As, Bs, layout)
        df = hk.delta_fro_norms(As, Bs, layout, 1.5)
        Ag, Bg = hk.weighted_aggregate(As, Bs, layout, w)
    assert cn.dtype == df.dtype == torch.float64
    for i, (a, b) in enumerate(zip(As, Bs)):
        assert rel_err(cn[i].cpu(), ref_component_norms(a, b, RANKS)) < 1e-12
        assert rel_err(df[i].cpu(), ref_delta_fro(a, b, RANKS, 1.5)) < 1e-12
        assert rel_err(Ag[i].cpu(), ref_aggregate(a, RANKS, w, max(RANKS))) < 1e-12
        assert rel_err(Bg[i].cpu(), ref_aggregate(b, RANKS, w, max(RANKS))) < 1e-12


# ------------------------------------------------------------------------------------------
# lists == layer by layer; mixed dtypes
# ------------------------------------------------------------------------------------------
def test_lists_equal_layer_by_layer():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, torch.float32, seed=7)
    Gs, Hs = make_layers(RANKS, WIDTHS, torch.float32, seed=8, rows=max(RANKS))
    w = torch.tensor([0.5, 0.1, 0.2, 0.2], dtype=torch.float64)
    s = torch.tensor([1.0, 2.0, 0.5, 1.0])
    with hk.use_backend("triton"):
        cn = hk.component_norms(As, Bs, layout)
        df = hk.delta_fro_norms(As, Bs, layout, s)
        Ag, Bg = hk.weighted_aggregate(As, Bs, layout, w)
        At, Bt, _ = hk.truncate(Gs, Hs, RANKS)
        for i in range(len(WIDTHS)):
            torch.testing.assert_close(hk.component_norms(As[i], Bs[i], layout), cn[i], rtol=1e-6, atol=0)
            torch.testing.assert_close(hk.delta_fro_norms(As[i], Bs[i], layout, s), df[i], rtol=1e-6, atol=0)
            a, b = hk.weighted_aggregate(As[i], Bs[i], layout, w)
            assert torch.equal(a, Ag[i]) and torch.equal(b, Bg[i])
            a, b, _ = hk.truncate(Gs[i], Hs[i], RANKS)
            assert torch.equal(a, At[i]) and torch.equal(b, Bt[i])


def test_mixed_dtypes_across_layers():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, torch.float32, seed=9)
    As[1], Bs[1] = As[1].to(torch.float16), Bs[1].to(torch.float16)
    w = torch.tensor([0.25] * 4, dtype=torch.float64)
    with hk.use_backend("triton"):
        cn = hk.component_norms(As, Bs, layout)
        df = hk.delta_fro_norms(As, Bs, layout)
        Ag, _ = hk.weighted_aggregate(As, Bs, layout, w)
    for i, (a, b) in enumerate(zip(As, Bs)):
        assert rel_err(cn[i].cpu(), ref_component_norms(a, b, RANKS)) < 5e-3
        assert rel_err(df[i].cpu(), ref_delta_fro(a, b, RANKS, 1.0)) < 5e-3
        assert Ag[i].dtype == a.dtype and rel_err(Ag[i].cpu(), ref_aggregate(a, RANKS, w, 6)) < 5e-3


# ------------------------------------------------------------------------------------------
# gradients of component_norms
# ------------------------------------------------------------------------------------------
def _norms64(A, B, ranks):
    """Differentiable float64 formula (torch autograd), [K, r_max]."""
    off = offsets(ranks)
    out = []
    for k, r in enumerate(ranks):
        row = [A[off[k] + j].norm() * B[off[k] + j].norm() for j in range(r)]
        row += [A.new_zeros(())] * (max(ranks) - r)
        out.append(torch.stack(row))
    return torch.stack(out)


def _with_zero_rows(As, Bs):
    As[0][2].zero_()  # a zero row of A (its B row is not zero)
    Bs[1][5].zero_()  # and of B
    As[1][9].zero_()
    Bs[1][9].zero_()  # a component zero on both sides


def test_component_norms_backward_vs_float64_autograd():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS[:2], torch.float32, seed=10)
    _with_zero_rows(As, Bs)
    As = [a.requires_grad_() for a in As]
    Bs = [b.requires_grad_() for b in Bs]
    G = torch.randn(2, len(RANKS), max(RANKS), generator=torch.Generator().manual_seed(11)).to(DEV)
    with hk.use_backend("triton"):
        out = hk.component_norms(As, Bs, layout)
    grads = torch.autograd.grad((out * G).sum(), As + Bs)
    A64 = [a.detach().double().cpu().requires_grad_() for a in As]
    B64 = [b.detach().double().cpu().requires_grad_() for b in Bs]
    ref = torch.stack([_norms64(a, b, RANKS) for a, b in zip(A64, B64)])
    ref_grads = torch.autograd.grad((ref * G.double().cpu()).sum(), A64 + B64)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert g.dtype == torch.float32
        assert rel_err(g.cpu(), rg) < 1e-5
    assert bool((grads[0][2] == 0).all())  # zero row: gradient 0, not NaN
    assert bool((grads[1][9] == 0).all()) and bool((grads[3][9] == 0).all())


def test_component_norms_gradcheck_float64():
    """float64 runs on the Triton kernels, so gradcheck exercises the hand-written backward."""
    ranks = [2, 1, 3]
    layout = hk.AdapterLayout(ranks)
    As, Bs = make_layers(ranks, [(3, 4), (5, 2)], torch.float64, seed=12)
    As[0][1].zero_()  # central differences of a norm at 0 are 0, as the backward says
    inputs = [t.requires_grad_() for t in As + Bs]

    def f(*ts):
        with hk.use_backend("triton"):
            return hk.component_norms(list(ts[:2]), list(ts[2:]), layout)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_component_norms_grad_half_dtype():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS[:1], torch.bfloat16, seed=13)
    A, B = As[0].requires_grad_(), Bs[0].requires_grad_()
    with hk.use_backend("triton"):
        hk.component_norms(A, B, layout).sum().backward()
    A64, B64 = A.detach().double().cpu().requires_grad_(), B.detach().double().cpu().requires_grad_()
    _norms64(A64, B64, RANKS).sum().backward()
    assert A.grad.dtype == torch.bfloat16
    assert rel_err(A.grad.cpu(), A64.grad) < 2e-2 and rel_err(B.grad.cpu(), B64.grad) < 2e-2


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_out_rank_below_a_rank_raises():
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, torch.float32, seed=14)
    with hk.use_backend("triton"), pytest.raises(ValueError, match="out_rank"):
        hk.weighted_aggregate(As, Bs, layout, torch.ones(4, dtype=torch.float64), out_rank=5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_client_raises_naming_it(bad):
    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS, torch.float32, seed=15)
    Bs[2][offsets(RANKS)[2] + 1, 3] = bad  # client 2, layer 2
    with hk.use_backend("triton"), pytest.raises(ValueError, match="adapter 2"):
        hk.weighted_aggregate(As, Bs, layout, torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# constant launches
# ------------------------------------------------------------------------------------------
def _count_launches(monkeypatch) -> dict[str, int]:
    """Launches per kernel, counted where every launch of the module passes (`server_ops._launch`),
    whichever path then launches it (Triton's, or the fast path's cache, which skips ``run``)."""
    counts: dict[str, int] = {}
    orig = server_ops._launch

    def spy(kernel, grid, *args, **kwargs):
        name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__
        counts[name] = counts.get(name, 0) + 1
        return orig(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(server_ops, "_launch", spy)
    return counts


def test_constant_launches_one_vs_five_layers(monkeypatch):
    counts = _count_launches(monkeypatch)
    layout = hk.AdapterLayout(RANKS)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    widths5 = [(8, 5), (12, 9), (5, 16), (9, 9), (16, 4)]
    seen = {}
    for L in (1, 5):
        As, Bs = make_layers(RANKS, widths5[:L], torch.float32, seed=16)
        Gs, Hs = make_layers(RANKS, widths5[:L], torch.float32, seed=17, rows=max(RANKS))
        As = [a.requires_grad_() for a in As]
        counts.clear()
        with hk.use_backend("triton"):
            hk.component_norms(As, Bs, layout).sum().backward()
            hk.delta_fro_norms([a.detach() for a in As], Bs, layout, 2.0)  # differentiable on torch alone
            hk.weighted_aggregate([a.detach() for a in As], Bs, layout, w)
            hk.truncate(Gs, Hs, RANKS)
        seen[L] = dict(counts)
    assert seen[1] == seen[5]
    assert seen[5] == {
        "_comp_norms_fwd_kernel": 1,
        "_comp_norms_bwd_kernel": 1,
        "_delta_fro_kernel": 1,
        "_aggregate_kernel": 1,
        "_gather_rows_kernel": 1,
    }


# ------------------------------------------------------------------------------------------
# the GPU code path compiles (the interpreter never lowers the kernels)
# ------------------------------------------------------------------------------------------
def test_kernels_compile_for_sm90_without_a_gpu():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "ignore", "-m", "hetlora_kernels.triton.server_compile", "--arch", "90"]
    proc = subprocess.run(cmd + ["--dtypes", "fp32,bf16"], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("triton has no ptxas here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {k.__name__ for k in server_ops.KERNELS}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}  # both dot paths (upcast and native)
    for r in rows:
        assert r["shared"] <= 227 * 1024, r  # H100's per-block shared-memory limit
        assert not r["local_memory"], r  # no register spills to local memory


def test_non_contiguous_inputs_and_poisoned_outputs(monkeypatch):
    """Strided inputs are read through their strides; every output element is written
    (fresh float buffers are filled with NaN while the ops run)."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    layout = hk.AdapterLayout(RANKS)
    As, Bs = make_layers(RANKS, WIDTHS[:2], torch.float32, seed=18)
    As[0] = As[0].t().contiguous().t()  # column-major
    Bs[1] = torch.randn(sum(RANKS), 3 * WIDTHS[1][1]).to(DEV)[:, 1::3]  # strided columns
    assert not As[0].is_contiguous() and not Bs[1].is_contiguous()
    w = torch.tensor([0.2, 0.3, -0.1, 0.6], dtype=torch.float64)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    with hk.use_backend("triton"):
        cn = hk.component_norms(As, Bs, layout)
        df = hk.delta_fro_norms(As, Bs, layout, 0.5)
        Ag, Bg = hk.weighted_aggregate(As, Bs, layout, w, out_rank=8)
    monkeypatch.setattr(torch, "empty", real_empty)
    for i, (a, b) in enumerate(zip(As, Bs)):
        assert rel_err(cn[i].cpu(), ref_component_norms(a, b, RANKS)) < 1e-4
        assert rel_err(df[i].cpu(), ref_delta_fro(a, b, RANKS, 0.5)) < 1e-4
        assert rel_err(Ag[i].cpu(), ref_aggregate(a, RANKS, w, 8)) < 1e-4
        assert rel_err(Bg[i].cpu(), ref_aggregate(b, RANKS, w, 8)) < 1e-4
        assert not Ag[i].isnan().any() and not Bg[i].isnan().any()
