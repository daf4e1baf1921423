"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator (tests/cuda_emu.py).

No GPU is needed: the ``.cu`` files are compiled unchanged (but for the launch syntax) with
g++ and every CUDA thread runs as a fiber, so warp shuffles and ``__syncthreads`` wait for
real.  The same checks as the C++ CPU kernels' (tests/test_cuda_backend.py) then run through
``use_backend("cuda")`` against the float64 references there.  Then the emulator itself is
shown to catch what it claims to: a kernel that reads or writes out of bounds, skips a zero
fill, leaves a lane out of a shuffle, or depends on the order threads run in.

What it cannot show: speed, and the memory model of a real GPU.  The gpu-marked tests in
test_cuda_backend.py run the same kernels on a GPU when one is present.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import hetlora_kernels as hk
from tests import cuda_emu
from tests import test_cuda_backend as cb

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator needs g++")

DTYPES = cb.DTYPES


@pytest.fixture(scope="module")
def emu():
    return cuda_emu.load()


@pytest.fixture
def emulated(emu):
    """The cuda backend's _C is the emulated one; the test must really launch kernels."""
    before = emu.counters()["launches"]
    emu.schedule("ascending")
    with cuda_emu.emulated(emu) as fake:
        yield fake
    emu.schedule("ascending")
    assert emu.counters()["launches"] > before, "no emulated kernel ran"


def test_every_launch_is_translated():
    # shrink, expand, wgrad (+ its reduce); component norms, aggregate, delta_fro_sq's tiles and sums
    launches = {"lora_kernels.cu": 4, "server_kernels.cu": 4}
    assert set(cuda_emu.KERNEL_FILES) == set(launches)
    for name in cuda_emu.KERNEL_FILES:
        text, n = cuda_emu.translate((cuda_emu.CUDA_DIR / name).read_text())
        assert n == launches[name], name
        assert "<<<" not in text and ">>>" not in text


def test_wgrad_slices_long_groups_only(emu):
    """cuda::wgrad_chunks: one pass for short groups or a full grid; slices for long groups."""
    c = cuda_emu.EmulatedC(emu).wgrad_chunks
    assert c(16384, 1, 4096, 64) == 16  # the H200's 18 ms case: 128 blocks -> 2048
    assert c(4096, 64, 4096, 64) == 1  # 64 tokens per adapter
    assert c(16384, 8, 4096, 64) == 1  # 1024 blocks already
    assert c(1100, 2, 8, 5) == 3  # ceil(550 / 256) slices
    assert c(0, 2, 8, 5) == c(1100, 0, 8, 5) == c(1100, 2, 0, 5) == 1
    assert c(1 << 22, 1, 4096, 64) * 4096 * 64 <= 1 << 28  # the workspace bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ["ascending", "random"])
def test_wgrad_two_pass_matches_the_reference(emu, dtype, order):
    """Long groups take the two-pass path (slices into a NaN-filled workspace, then a reduce in
    slice order): the float64 reference's dW, an idle adapter's rows exactly 0, -1 tokens
    ignored, and bitwise the same under another thread order."""
    fake = cuda_emu.EmulatedC(emu)
    ranks = [3, 5, 2]
    layout = hk.AdapterLayout(ranks)
    gen = torch.Generator().manual_seed(57)
    ids = torch.randint(0, 3, (1700,), generator=gen)
    ids[ids == 1] = 2  # adapter 1 idle
    ids[:40] = -1
    groups = hk.TokenGroups.from_adapter_ids(ids, 3)
    T, d = len(ids), 12
    assert fake.wgrad_chunks(T, 3, d, layout.max_rank) > 1
    h = torch.randn(T, layout.max_rank, generator=gen, dtype=torch.float64).to(cuda_emu._acc(dtype))
    x = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype)
    scales = torch.tensor([0.5, 3.0, 1.25])
    offsets = layout.offsets_tensor(torch.device("cpu"))
    emu.schedule("ascending")
    want_bits = fake.wgrad(h, x, groups.order, groups.starts, offsets, scales, 1.0, layout.total_rank)
    emu.schedule(order, seed=5)
    got = fake.wgrad(h, x, groups.order, groups.starts, offsets, scales, 1.0, layout.total_rank)
    emu.schedule("ascending")
    assert torch.equal(got, want_bits)
    assert torch.isfinite(got).all()
    ref = torch.zeros(layout.total_rank, d, dtype=torch.float64)
    for k in (0, 2):
        rows, tok = layout.rows(k), (ids == k).nonzero().squeeze(1)
        ref[rows] = scales[k].double() * h[tok, : ranks[k]].double().t() @ x[tok].double()
    assert (got[layout.rows(1)] == 0).all()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < cb.TOL[dtype], err


def test_delta_fro_splits_fill_a_small_grid_only(emu):
    """cuda::delta_fro_splits: column ranges only where one pass would leave the GPU idle."""
    c = cuda_emu.EmulatedC(emu).delta_fro_splits
    assert c(1, 8, 64, 4096) == 26  # the H200's 4.5 ms case: 80 tile pairs -> 2080 blocks
    assert c(12, 256, 64, 4096) == 1  # 30720 blocks already
    assert c(1, 8, 64, 100) == 2  # at least one 64-column step per range
    assert c(0, 8, 64, 4096) == c(1, 0, 64, 4096) == c(1, 8, 0, 4096) == c(1, 8, 64, 0) == 1


# (ranks, layer widths (d_in, d_out), whether the columns are cut into ranges)
_FRO_CASES = {
    "one-pass": ([33, 2, 1, 17], [(24, 40), (9, 64)], False),
    "ranges": ([1, 3, 40, 7, 16], [(300, 130), (77, 5)], True),
}


def _fro_sq_ref(As, Bs, layout) -> torch.Tensor:
    return torch.stack([
        torch.stack([(B[layout.rows(k)].double().t() @ A[layout.rows(k)].double()).norm() ** 2
                     for k in range(layout.num_adapters)])
        for A, B in zip(As, Bs)
    ])  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "ranks, dims, ranges",
    [
        _FRO_CASES["one-pass"],  # 3 x 3 tiles: off-diagonal pairs
        _FRO_CASES["ranges"],  # column ranges, layers of unequal widths
    ],
    ids=["one-pass", "ranges"],
)
def test_delta_fro_sq_tiles_match_the_reference(emu, dtype, ranks, dims, ranges):
    """||B_k^T A_k||_F^2 from 16 x 16 Gram tiles (workspace NaN-filled before the launch): the
    float64 reference of the rounded inputs, bitwise the same under another thread order, and
    the same with r_max overstated (tiles past every rank exit)."""
    _delta_fro_checks(emu, dtype, ranks, dims, ranges)


@pytest.mark.parametrize(
    "old, new, case",
    [
        ("  if (ti < tj) return A(2);", "  if (ti < tj) return A(1);", "one-pass"),  # off-diagonal counted once
        ("for (int s = 0; s < S; ++s) {", "for (int s = 0; s + 1 < S; ++s) {", "ranges"),  # last range dropped
        ("if (static_cast<int64_t>(tj) * kGram >= rk) return;", "if (tj > 0) return;", "one-pass"),  # tiles skipped
    ],
    ids=["weight", "range", "tiles"],
)
def test_a_broken_delta_fro_kernel_is_caught(old, new, case):
    emu = _mutated("server_kernels.cu", old, new)
    with pytest.raises(AssertionError):
        _delta_fro_checks(emu, torch.float64, *_FRO_CASES[case])


def _delta_fro_checks(emu, dtype, ranks, dims, ranges) -> None:
    fake = cuda_emu.EmulatedC(emu)
    layout = hk.AdapterLayout(ranks)
    gen = torch.Generator().manual_seed(len(ranks))
    As = [torch.randn(layout.total_rank, di, generator=gen).to(dtype) for di, _ in dims]
    Bs = [torch.randn(layout.total_rank, do, generator=gen).to(dtype) for _, do in dims]
    max_d = max(max(d) for d in dims)
    assert (fake.delta_fro_splits(len(dims), len(ranks), layout.max_rank, max_d) > 1) == ranges
    offsets = layout.offsets_tensor(torch.device("cpu"))
    emu.schedule("ascending")
    got = fake.delta_fro_sq(As, Bs, offsets, layout.max_rank)
    emu.schedule("random", seed=3)
    again = fake.delta_fro_sq(As, Bs, offsets, layout.max_rank)
    emu.schedule("ascending")
    assert torch.equal(got, again)
    ref = _fro_sq_ref(As, Bs, layout)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # rounded inputs: only the sums' rounding is left
    assert cb.rel_err(got, ref) < tol
    wide = fake.delta_fro_sq(As, Bs, offsets, layout.max_rank + 20)
    assert cb.rel_err(wide, ref) < tol


def test_delta_fro_sq_refuses_an_understated_r_max(emu):
    """An adapter ranked past r_max gets NaN (its tiles past r_max never ran), not a partial sum."""
    fake = cuda_emu.EmulatedC(emu)
    layout = hk.AdapterLayout([3, 20, 5])
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(layout.total_rank, 30, generator=gen), torch.randn(layout.total_rank, 11, generator=gen)
    got = fake.delta_fro_sq([A], [B], layout.offsets_tensor(torch.device("cpu")), 16)
    ref = _fro_sq_ref([A], [B], layout)
    assert torch.isnan(got[0, 1])
    assert cb.rel_err(got[0, [0, 2]], ref[0, [0, 2]]) < 1e-5


# ------------------------------------------------------------------------------------------
# the checks of the C++ CPU kernels, through the CUDA kernels
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", cb.CASES)
def test_lora_delta_forward_backward(emulated, case, dtype):
    cb._check_delta_and_grads(case, dtype, "tensor" if case != "lengths" else "float", "cpu")


@pytest.mark.parametrize("scaling_kind", ["float", "tensor"])
def test_lora_delta_scaling_kinds(emulated, scaling_kind):
    cb._check_delta_and_grads("mixed", torch.float32, scaling_kind, "cpu")


def test_lora_linear_and_noncontiguous_inputs(emulated):
    cb.test_lora_linear_cpu()
    cb.test_noncontiguous_inputs_cpu()


@pytest.mark.parametrize("d_in, d_out", [(1, 1), (33, 5), (256, 512), (7, 300), (1037, 263)])
def test_primitives_odd_widths(emulated, d_in, d_out):
    """shrink/expand/wgrad one by one: widths below, at and past a warp (32) and a column
    tile (256), a rank-0 adapter, ranks past a register group (8), exact zeros where owed."""
    cb.test_primitives_odd_widths_cpu(d_in, d_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_blocked_case_against_reference(emulated, dtype):
    """Long segments, an empty adapter, -1 tokens, ranks 1..67, odd widths past a tile."""
    x, A, B, layout, groups, ids = cb._blocked_case(dtype, T=48, d_in=301, d_out=263)
    s = torch.linspace(0.5, 2.0, layout.num_adapters, dtype=torch.float64 if dtype == torch.float64 else None)
    got = cb._fwd_bwd(x, A, B, layout, groups, s)
    xd, Ad, Bd = (t.double().requires_grad_(True) for t in (x, A, B))
    ref = cb.dense_delta(xd, Ad, Bd, layout, ids, s)
    dy = torch.linspace(-1, 1, ref.numel()).reshape(ref.shape).to(dtype).double()
    want = (ref, *torch.autograd.grad(ref, (xd, Ad, Bd), dy))
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert cb.rel_err(g, w) < cb.TOL[dtype], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_server_ops(emulated, dtype):
    cb.test_component_norms_cpu(dtype)
    cb.test_delta_fro_norms_cpu(dtype)
    cb.test_weighted_aggregate_cpu(dtype)


def test_server_ops_gradients_mixed_dtypes_and_nonfinite(emulated):
    # (no gradcheck: its thousands of forward calls would take a minute emulated; the
    # gradients come from the kernels' row norms, checked against the torch backend here)
    cb.test_component_norms_list_gradients_cpu()
    cb.test_server_ops_mixed_dtype_layers_cpu()
    cb.test_weighted_aggregate_rejects_nonfinite_client()


def _shrink_all_routed(d: int = 45) -> None:
    """No -1 token, so the binding allocates h uninitialised: the kernel itself must zero
    every entry past a token's rank (the wgrad of the backward reads h)."""
    layout = hk.AdapterLayout([3, 9, 1, 12])
    gen = torch.Generator().manual_seed(d)
    ids = torch.randint(0, layout.num_adapters, (37,), generator=gen)
    groups = hk.TokenGroups.from_adapter_ids(ids, layout.num_adapters)
    x, A = torch.randn(37, d, generator=gen), torch.randn(layout.total_rank, d, generator=gen)
    s = torch.rand(layout.num_adapters, generator=gen) + 0.5
    h = cb._C().shrink(x, A, groups.order, groups.starts, layout.offsets_tensor("cpu"), s, 1.0, 0, layout.max_rank)
    for k in range(layout.num_adapters):
        m = ids == k
        want = float(s[k]) * x[m].double() @ A[layout.rows(k)].double().t()
        assert cb.rel_err(h[m, : layout.ranks[k]], want) < 1e-6
        assert torch.equal(h[m, layout.ranks[k] :], torch.zeros_like(h[m, layout.ranks[k] :]))


def test_shrink_zeroes_past_each_rank_without_unrouted_tokens(emulated):
    _shrink_all_routed()


def test_matches_the_cpp_cpu_kernels(emu):
    """The CUDA and the C++ CPU kernels of one op agree (to rounding: their sums differ in order)."""
    x, A, B, layout, groups, _ = cb.make_case("mixed", torch.float32, d_in=300, d_out=260, seed=3)
    s = torch.rand(layout.num_adapters)
    before = emu.counters()["launches"]
    cpu = cb._fwd_bwd(x, A, B, layout, groups, s)
    assert emu.counters()["launches"] == before
    with cuda_emu.emulated(emu):
        gpu = cb._fwd_bwd(x, A, B, layout, groups, s)
    assert emu.counters()["launches"] > before
    for a, b in zip(gpu, cpu):
        assert cb.rel_err(a, b) < 1e-5


def test_a_federated_round_on_the_cuda_kernels_equals_the_torch_backend(tmp_path, emu):
    """Local training, aggregation and evaluation of a simulated round, in float64: the state
    after the round on the emulated CUDA kernels is the torch backend's, to rounding."""
    from hetlora.fl import Simulation
    from tests.test_sim import _cfg

    states = {}
    for backend in ("torch", "cuda"):
        before = emu.counters()["launches"]
        with cuda_emu.emulated(emu):
            sim = Simulation(_cfg(tmp_path / backend, rounds=1, dtype="float64", backend=backend), verbose=False)
            sim.setup()
            sim.run_round(1)
        states[backend] = sim.state
        ran = emu.counters()["launches"] - before
        assert (ran > 0) == (backend == "cuda"), ran
    a, b = states["torch"], states["cuda"]
    for x, y in zip(a.A + a.B + [a.head_W], b.A + b.B + [b.head_W]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_serving_many_adapters_on_the_cuda_kernels(emu):
    """A MultiLoraModel (GPT-2 shaped, Conv1D targets) serving a batch with an adapter per prompt
    (and the base model for one): logits and greedy generations on the emulated CUDA kernels
    are the torch backend's."""
    from hetlora import MultiLoraModel
    from hetlora.fl.sim import tiny_gpt2

    torch.manual_seed(0)
    m = MultiLoraModel(tiny_gpt2(0), ["c_attn", "c_fc"], [2, 5, 3], alpha=8.0).eval()
    for p in m.lora_parameters():
        torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(0, 50, (4, 6))
    mask = torch.ones_like(ids)
    aid = torch.tensor([1, -1, 0, 2])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = {}
    for backend in ("torch", "cuda"):
        before = emu.counters()["launches"]
        with cuda_emu.emulated(emu), hk.use_backend(backend), torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask, adapter_ids=aid).logits
            gen = m.generate(input_ids=ids, attention_mask=mask, adapter_ids=aid, **kw)
        assert (emu.counters()["launches"] > before) == (backend == "cuda")
        out[backend] = (logits, gen)
    torch.testing.assert_close(out["cuda"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["cuda"][1], out["torch"][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_thread_order(emu, dtype):
    """Bitwise the same whether ready threads run in ascending, descending or random order."""
    x, A, B, layout, groups, _ = cb.make_case("mixed", dtype, d_in=70, d_out=300)
    s = torch.rand(layout.num_adapters)
    layers = cb._layers(dtype)
    runs = []
    for mode, seed in (("ascending", 0), ("descending", 0), ("random", 1), ("random", 2)):
        emu.schedule(mode, seed)
        try:
            with cuda_emu.emulated(emu), hk.use_backend("cuda"):
                out = cb._fwd_bwd(x, A, B, layout, groups, s)
                out += (hk.component_norms(*layers[1:], layers[0]), hk.delta_fro_norms(*layers[1:], layers[0]))
                out += tuple(hk.weighted_aggregate(*layers[1:], layers[0], [0.1, 0.2, 0.3, 0.15, 0.25], 20)[0])
        finally:
            emu.schedule("ascending")
        runs.append(out)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# the emulator catches broken kernels (each mutation is a bug the checks above must see)
# ------------------------------------------------------------------------------------------
def _mutated(file: str, old: str, new: str) -> cuda_emu.Emulator:
    def mutate(name: str, text: str) -> str:
        if name != file:
            return text
        assert text.count(old) == 1, f"mutation target not found once in {file}: {old!r}"
        return text.replace(old, new)

    return cuda_emu.load(cuda_emu.build(mutate))


# the run search shared by shrink and expand (`run_at`)
_RUN_SEGMENT = "const int k = find_segment(starts, K, p);  // the adapter whose group holds p"


def _lora_checks(emu) -> None:
    with cuda_emu.emulated(emu):
        cb._check_delta_and_grads("mixed", torch.float32, "tensor", "cpu")
        cb.test_primitives_odd_widths_cpu(33, 300)
        _shrink_all_routed()


@pytest.mark.parametrize(
    "old, new, what",
    [
        ("for (int64_t j = rk + lane; j < r_max; j += 32) h[tok[i] * r_max + j] = A(0);", ";",
         "no zero fill past r_k"),
        (
            "if (c >= d) return;\n  const int64_t p_begin",
            "const int64_t p_begin",
            "expand writes past the last column",
        ),
        (
            "const int64_t end = starts[k + 1] < p_end ? starts[k + 1] : p_end;",
            "const int64_t end = p_end;",
            "shrink and expand run a tile's next adapter's tokens with the adapter before",
        ),
        (
            "const int64_t p_end = p_begin + kTokens < T_total ? p_begin + kTokens : T_total;",
            "const int64_t p_end = p_begin + kTokens - 1 < T_total ? p_begin + kTokens - 1 : T_total;",
            "expand leaves each tile's last token out",
        ),
        (
            _RUN_SEGMENT,
            _RUN_SEGMENT.replace("(starts, K, p)", "(starts, K - 1, p)"),
            "shrink and expand take the last adapter's tokens for the one before",
        ),
        (
            "if (j0 >= rk || c >= d) return;\n  const int nu = rk - j0 < kRows ? rk - j0 : kRows;",
            "if (j0 >= rk || c >= d) return;\n  const int nu = kRows;",
            "wgrad writes rows past an adapter's rank",
        ),
    ],
    ids=["zero-fill", "expand-bounds", "runs", "expand-short", "segment", "wgrad-rows"],
)
def test_a_broken_lora_kernel_is_caught(old, new, what):
    emu = _mutated("lora_kernels.cu", old, new)
    with pytest.raises((AssertionError, RuntimeError)):
        _lora_checks(emu)


def test_a_lane_left_out_of_a_shuffle_is_reported():
    emu = _mutated("lora_kernels.cu", "if (p_begin >= T_total) return;", "if (p_begin >= T_total || lane == 7) return;")
    with pytest.raises(
        RuntimeError, match=r"lane 7\]: exits while \d+ lane\(s\) of its warp wait in a full-mask shuffle"
    ):
        _lora_checks(emu)


def test_a_missing_barrier_is_caught():
    """Without __syncthreads, thread 0 sums the warps' partial results before all are written."""
    emu = _mutated("server_kernels.cu", "  __syncthreads();\n  A total = A(0);", "  A total = A(0);")
    layout, As, Bs = cb._layers(torch.float64)
    with cuda_emu.emulated(emu), hk.use_backend("cuda"):
        results = []
        for mode in ("ascending", "descending"):
            emu.schedule(mode)
            results.append(hk.delta_fro_norms(As, Bs, layout))
        emu.schedule("ascending")
    ref = torch.stack([
        torch.stack([(B[layout.rows(k)].t() @ A[layout.rows(k)]).norm() for k in range(layout.num_adapters)])
        for A, B in zip(As, Bs)
    ])  # fmt: skip
    assert any(not torch.allclose(r, ref, rtol=1e-9) for r in results)


def test_guards_catch_an_out_of_bounds_write(emu):
    """The sentinels around device buffers: a write one past the end is reported."""
    mem = cuda_emu._Guarded()
    mem.alloc((3, 5), torch.float32, zero=False)
    mem.check("nothing")
    mem.buffers[0][cuda_emu.GUARD + 15] = 1.0
    with pytest.raises(AssertionError, match="wrote after"):
        mem.check("op")


def test_an_invalid_launch_is_refused():
    """A block CUDA would refuse (2048 threads) fails the launch, as it would on a GPU."""
    emu = _mutated("lora_kernels.cu", "constexpr int kThreads = 256;", "constexpr int kThreads = 2048;")
    with pytest.raises(
        RuntimeError, match=r"cudaErrorInvalidConfiguration: invalid launch configuration.*block \(2048"
    ):
        _lora_checks(emu)
