"""``torch.compile`` over the LoRA ops, the layer and the model (`hetlora_kernels.custom_ops`).

Under compilation ``lora_delta`` / ``lora_linear`` become two custom ops; these tests check
that the compiled results are the eager ones (bit for bit where the same kernels run), that a
new batch composition never recompiles, that the ops pass torch's own custom-op checks, and
that a compiled `MultiLoraModel` traces its layers in one graph and trains to eager's gradients.
Most compile with ``backend="aot_eager"`` (Dynamo and AOTAutograd, no code generation): the
part that sees our ops, at a fraction of Inductor's compile time on this CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import hetlora_kernels as hk
from hetlora_kernels import AdapterLayout, TokenGroups, custom_ops, lora_delta, lora_linear
from tests.helpers import cpu_backend_params, dense_delta, random_case, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = [3, 1, 7, 4]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _case(dtype, seed=0, T=13, d_in=24, d_out=20, with_unrouted=True):
    x, A, B, ids = random_case(RANKS, T, d_in, d_out, dtype=dtype, with_unrouted=with_unrouted, seed=seed)
    return [t.to(DEV).requires_grad_() for t in (x, A, B)], ids


def _grads(fn, x, A, B, groups, scaling, w):
    y = fn(x, A, B, AdapterLayout(RANKS), groups, scaling)
    gx, gA, gB = torch.autograd.grad((y.float() * w).sum(), (x, A, B))
    return y.detach(), gx, gA, gB


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scaling", ["float", "list", "tensor"])
def test_compiled_lora_delta_is_the_eager_op_bit_for_bit(backend, dtype, scaling):
    hk.set_backend(backend)
    (x, A, B), ids = _case(dtype)
    groups = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    s = {"float": 0.75, "list": [0.5, 2.0, 1.0, 0.25],
         "tensor": torch.tensor([0.5, 2.0, 1.0, 0.25], device=DEV)}[scaling]
    w = torch.randn(x.shape[0], B.shape[1], device=DEV)
    eager = _grads(lora_delta, x, A, B, groups, s, w)
    compiled = _grads(torch.compile(lora_delta, backend="aot_eager", fullgraph=True), x, A, B, groups, s, w)
    for name, e, c in zip(("y", "dx", "dA", "dB"), eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape, name
        assert torch.equal(c, e), f"{name}: compiled differs from eager by {(c.double() - e.double()).abs().max()}"
    # and both against the float64 dense formula
    sl = [0.75] * len(RANKS) if scaling == "float" else [0.5, 2.0, 1.0, 0.25]
    ref = dense_delta(x.detach().cpu(), A.detach().cpu(), B.detach().cpu(), RANKS, ids, sl)
    assert rel_err(compiled[0].cpu(), ref) < TOL[dtype]


def test_a_new_batch_composition_is_new_data_not_a_new_graph():
    """Every grouping of the same number of tokens (unsorted ids, -1 ids, idle adapters, all on
    one adapter, none routed, already grouped) runs through one compiled graph."""
    hk.set_backend("torch")
    counter = CompileCounter()
    (x, A, B), _ = _case(torch.float32, T=12)
    fn = torch.compile(lora_delta, backend=counter, fullgraph=True)
    K = len(RANKS)
    id_sets = [
        torch.tensor([3, 0, 2, -1, 3, 1, 0, 2, 2, -1, 0, 3]),
        torch.tensor([0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3]),  # two adapters idle
        torch.full((12,), -1),  # nothing routed
        torch.full((12,), 2),
    ]
    groupings = [TokenGroups.from_adapter_ids(i, K) for i in id_sets] + [TokenGroups.from_lengths([5, 0, 4, 3])]
    for g in groupings:
        g = g.to(DEV)
        y = fn(x, A, B, AdapterLayout(RANKS), g, 0.5)
        assert torch.equal(y, lora_delta(x, A, B, AdapterLayout(RANKS), g, 0.5))
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one token count"


def test_compiled_lora_linear_matches_eager():
    hk.set_backend("torch")
    (x, A, B), ids = _case(torch.float32)
    W = torch.randn(B.shape[1], x.shape[1], device=DEV, requires_grad=True)
    bias = torch.randn(B.shape[1], device=DEV, requires_grad=True)
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    lay = AdapterLayout(RANKS)

    def run(fn):
        y = fn(x, W, bias, A, B, lay, g, [1.0, 0.5, 2.0, 1.5])
        return (y, *torch.autograd.grad(y.square().sum(), (x, W, bias, A, B)))

    for e, c in zip(run(lora_linear), run(torch.compile(lora_linear, backend="aot_eager", fullgraph=True))):
        assert rel_err(c, e) < 1e-6


@pytest.mark.parametrize("fwd_backend,bwd_backend", [("torch", "cuda"), ("cuda", "torch"), ("triton", "torch"),
                                                     ("torch", "triton")])
def test_a_backward_may_run_on_another_backend(fwd_backend, bwd_backend):
    """The saved ``h`` has one format for every backend (`custom_ops`' docstring)."""
    for name in (fwd_backend, bwd_backend):
        ok, why = hk.backend_status(name, DEV)
        if not ok:
            pytest.skip(f"{name}: {why}")
    (x, A, B), ids = _case(torch.float32, seed=3)
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    lay = AdapterLayout(RANKS)
    w = torch.randn(x.shape[0], B.shape[1], device=DEV)
    with hk.use_backend(fwd_backend):
        y = custom_ops.lora_delta(x, A, B, lay, g, 0.5)
    with hk.use_backend(bwd_backend):
        got = torch.autograd.grad((y * w).sum(), (x, A, B))
    with hk.use_backend("torch"):
        want = torch.autograd.grad((lora_delta(x, A, B, lay, g, 0.5) * w).sum(), (x, A, B))
    for name, a, b in zip(("dx", "dA", "dB"), got, want):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("needs", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1)],
                         ids=lambda n: "".join("xAB"[i] for i in range(3) if n[i]))
def test_any_subset_of_the_gradients(backend, needs):
    """Only B trained (LoRA-FA), only x (a frozen adapter, gradients for soft prompts), ...: every
    subset of (x, A, B) that needs a gradient gets eager's, and no other."""
    hk.set_backend(backend)
    (x, A, B), ids = _case(torch.float32, seed=7)
    x, A, B = (t.detach().requires_grad_(bool(n)) for t, n in zip((x, A, B), needs))
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    lay = AdapterLayout(RANKS)
    wanted = [t for t in (x, A, B) if t.requires_grad]
    w = torch.randn(x.shape[0], B.shape[1], device=DEV)
    eager = torch.autograd.grad((lora_delta(x, A, B, lay, g, 0.5) * w).sum(), wanted)
    fn = torch.compile(lora_delta, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad((fn(x, A, B, lay, g, 0.5) * w).sum(), wanted)
    for e, c in zip(eager, got):
        assert torch.equal(c, e)


def test_transposed_inputs_under_inductor():
    """x, A or B with transposed strides (a peft B loaded as ``lora_B.weight.t()``): Inductor checks
    the strides the ops return against their shape functions."""
    hk.set_backend("torch")
    (x, A, B), ids = _case(torch.float32, seed=8)
    xt, At, Bt = (t.detach().t().contiguous().t().requires_grad_() for t in (x, A, B))
    assert not xt.is_contiguous() and not Bt.is_contiguous()
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    lay = AdapterLayout(RANKS)
    w = torch.randn(x.shape[0], B.shape[1], device=DEV)

    def loss(fn):
        return torch.autograd.grad((fn(xt, At, Bt, lay, g, 0.5) * w).sum(), (xt, At, Bt))

    for e, c in zip(loss(lora_delta), loss(torch.compile(lora_delta))):
        assert rel_err(c, e) < 1e-6


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_the_custom_ops_pass_torch_opcheck(backend):
    hk.set_backend(backend)
    (x, A, B), ids = _case(torch.float32)
    g = TokenGroups.from_adapter_ids(ids, len(RANKS))
    args = (x, A, B, g.adapter_ids, g.order, g.starts, g.counts, g.host_meta, RANKS, None, [0.5] * len(RANKS))
    torch.library.opcheck(torch.ops.hetlora.lora_delta_fwd.default, args)
    y, h = torch.ops.hetlora.lora_delta_fwd(*args)
    dy = torch.randn_like(y)
    # the backward op is not itself differentiable (once_differentiable, like the eager kernels)
    bargs = (dy, x.detach(), A.detach(), B.detach(), h.detach(), *args[3:], [True, False, True])
    torch.library.opcheck(torch.ops.hetlora.lora_delta_bwd.default, bargs)
    xt = x.detach().t().contiguous().t()  # transposed strides: the results must still be contiguous
    torch.library.opcheck(torch.ops.hetlora.lora_delta_bwd.default, (dy, xt, *bargs[2:]))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` / ``empty_like`` from Python return NaN-filled floats: an entry a kernel
    leaves unwritten shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("backend,fused", [pytest.param(*p.values, f, marks=p.marks,
                                                        id=f"{p.id}-{'fused' if f else 'two-launch'}")
                                           for p in cpu_backend_params() for f in ((False, True) if p.id == "triton"
                                                                                    else (None,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_saved_h_is_defined_everywhere(backend, fused, dtype, poisoned_empty, monkeypatch):
    """A custom op's result must not hold garbage (torch may compare or copy it): h is
    ``x_k A_k^T`` at adapter k's positions and columns, zero in every other entry (Triton: both
    the fused forward and shrink + expand)."""
    if fused is not None:
        from hetlora_kernels.triton import fused as fused_mod

        monkeypatch.setattr(fused_mod, "FORCE_FUSED", fused)
    hk.set_backend(backend)
    (x, A, B), ids = _case(dtype, seed=5, T=17)
    ids[:3] = -1
    g = TokenGroups.from_adapter_ids(ids, len(RANKS))
    y, h = torch.ops.hetlora.lora_delta_fwd(x.detach(), A.detach(), B.detach(), g.adapter_ids, g.order, g.starts,
                                            g.counts, g.host_meta, RANKS, None, [0.5] * len(RANKS))
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(y).any() and not torch.isnan(h).any()
    want = torch.zeros(h.shape, dtype=torch.float64)
    offs = AdapterLayout(RANKS).offsets
    for k, r in enumerate(RANKS):
        p0, n = g.starts_list[k], g.counts_list[k]
        toks = g.order[p0: p0 + n]
        want[p0: p0 + n, :r] = x.detach().double()[toks] @ A.detach().double()[offs[k]: offs[k] + r].t()
    assert torch.equal(h[want == 0], torch.zeros_like(h[want == 0]))
    assert rel_err(h, want) < TOL[dtype]


def test_the_ops_are_kept_out_of_inductors_cuda_graphs():
    """A call's kernel schedule comes from its batch's host facts: a CUDA graph replaying a
    captured call would run another batch with the captured batch's schedule.  The tag makes
    Inductor (mode="reduce-overhead") partition its graphs around the ops instead."""
    for op in (torch.ops.hetlora.lora_delta_fwd.default, torch.ops.hetlora.lora_delta_bwd.default):
        assert torch.Tag.cudagraph_unsafe in op.tags


def test_the_ops_find_the_groups_that_made_their_tensors():
    """At run time the ops serve a call with the `TokenGroups` that built ``host_meta`` (its
    kernel schedules are cached there, for every layer); tensors from elsewhere (a copy, a
    pickled groups) get groups rebuilt from the tensors alone, with the same host facts."""
    import copy
    import pickle

    ids = torch.tensor([2, 0, -1, 2, 1, 0, -1])
    g = TokenGroups.from_adapter_ids(ids, 3)
    parts = (g.adapter_ids, g.order, g.starts, g.counts, g.host_meta)
    assert custom_ops._groups(*parts) is g
    for other in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        rebuilt = custom_ops._groups(other.adapter_ids, other.order, other.starts, other.counts, other.host_meta)
        assert rebuilt is not g and rebuilt is not other
        assert (rebuilt.counts_list, rebuilt.starts_list, rebuilt.is_sorted) == (g.counts_list, g.starts_list, False)
    sorted_g = TokenGroups.from_lengths([2, 0, 3])
    clone = custom_ops._groups(sorted_g.adapter_ids, sorted_g.order, sorted_g.starts, sorted_g.counts,
                               sorted_g.host_meta.clone())
    assert clone is not sorted_g and clone.is_sorted and clone.counts_list == (2, 0, 3)


def test_bad_shapes_under_compile_name_the_argument():
    (x, A, B), ids = _case(torch.float32)
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    fn = torch.compile(lora_delta, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"A must be \[R=15"):
        fn(x, A[:-1], B, AdapterLayout(RANKS), g, 0.5)
    with pytest.raises(Exception, match="groups cover 13 tokens but x holds"):
        fn(x[:-1], A, B, AdapterLayout(RANKS), g, 0.5)
    # raised while tracing: without fullgraph Dynamo hands the call to eager, which raises the same
    with pytest.raises(ValueError, match="scaling must be a float or hold K=4 values, got 1"):
        torch.compile(lora_delta, backend="aot_eager")(x, A, B, AdapterLayout(RANKS), g, [0.5])
    with pytest.raises(TypeError, match="groups must be a TokenGroups"):
        custom_ops.lora_delta(x, A, B, AdapterLayout(RANKS), ids, 0.5)


def test_the_compiled_route_takes_the_scalings_eager_takes():
    """A 0-dim tensor and numpy scalars work as in eager; bools and strings in a list are refused
    with eager's message (the compiled route must not turn them into numbers)."""
    import numpy as np

    hk.set_backend("torch")
    (x, A, B), ids = _case(torch.float32)
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    lay = AdapterLayout(RANKS)
    for s in (torch.tensor(0.5, device=DEV), np.float32(0.5), [np.float64(0.5), 0.5, 0.5, 0.5]):
        eager = lora_delta(x, A, B, lay, g, s)
        assert torch.equal(custom_ops.lora_delta(x, A, B, lay, g, s), eager)
        assert torch.equal(torch.compile(lora_delta, backend="aot_eager")(x, A, B, lay, g, s), eager)
    for bad, match in (([True, 0.5, 0.5, 0.5], r"scaling\[0\] must be a finite number"),
                       ([0.5, "2", 0.5, 0.5], r"scaling\[1\] must be a finite number")):
        with pytest.raises(ValueError, match=match):
            lora_delta(x, A, B, lay, g, bad)
        with pytest.raises(ValueError, match=match):
            custom_ops.lora_delta(x, A, B, lay, g, bad)


def test_values_are_validated_at_run_time_as_in_eager():
    """What only values can show (an out-of-range scale tensor entry, NaN scaling) is refused by
    the op itself when the compiled code runs, with the eager message."""
    hk.set_backend("torch")
    (x, A, B), ids = _case(torch.float32)
    g = TokenGroups.from_adapter_ids(ids.to(DEV), len(RANKS))
    fn = torch.compile(lora_delta, backend="aot_eager", fullgraph=True)
    bad = torch.tensor([1.0, float("nan"), 1.0, 1.0], device=DEV)
    with pytest.raises(Exception, match=r"scaling(\[1\])? must be (a )?finite"):
        fn(x, A, B, AdapterLayout(RANKS), g, bad)


def test_server_ops_run_eagerly_inside_compiled_code():
    hk.set_backend("torch")
    lay = AdapterLayout(RANKS)
    (_, A, B), _ = _case(torch.float32)

    def server(A, B):
        n = hk.component_norms(A, B, lay)
        f = hk.delta_fro_norms(A, B, lay)
        Ag, Bg = hk.weighted_aggregate(A, B, lay, f / f.sum())
        return n, f, Ag, Bg, *hk.truncate(Ag, Bg, [2, 1, 3])[:2]

    for e, c in zip(server(A, B), torch.compile(server, backend="aot_eager")(A, B)):
        assert torch.equal(c, e)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def _bert(seed=0):
    from transformers import BertConfig, BertModel

    from hetlora import MultiLoraModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    m = MultiLoraModel(BertModel(cfg), ["query", "value", "dense"], ranks=[2, 5, 3], alpha=8).to(DEV)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()  # peft's zero init would leave every B gradient path untested
    return m


BATCHES = [  # (sequences, length, adapter ids): new compositions, new shapes
    (3, 7, [0, 2, 1]),
    (3, 7, [2, 2, -1]),
    (4, 9, [1, 0, 0, 2]),
    (5, 6, [0, 1, 2, -1, 1]),
]


def _step(model, ids, aid):
    """Forward and backward through ``model`` (eager or compiled); the gradients by parameter name."""
    plain = getattr(model, "_orig_mod", model)  # a compiled module's parameters are its model's
    plain.zero_grad()
    y = model(input_ids=ids, adapter_ids=aid).last_hidden_state
    # a fixed random projection: a LayerNorm output's mean square is nearly constant, and its
    # gradients would be rounding noise
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(y.numel())).to(y.device)
    (y * w).sum().backward()
    # the pooler's dense layer does not feed last_hidden_state: no gradient there
    return y.detach(), {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}


def _matches_eager(m, cm, batches, seed: int, y_tol: float, g_tol: float):
    """Forward and backward of each batch through eager ``m`` and compiled ``cm``: outputs and every
    LoRA gradient within the tolerances.  Returns the last batch's (input ids, adapter ids)."""
    gen = torch.Generator().manual_seed(seed)
    for B, L, aid in batches:
        ids = torch.randint(0, 97, (B, L), generator=gen).to(DEV)
        aid = torch.tensor(aid)
        y0, g0 = _step(m, ids, aid)
        y1, g1 = _step(cm, ids, aid)
        assert rel_err(y1, y0) < y_tol
        assert len(g0) == 2 * 5 * 2  # (A, B) x 5 dense layers x 2 blocks
        # Inductor gives the pooler's unused LoRA a zero gradient where eager leaves none (torch's
        # own behaviour: a compiled plain nn.Linear does the same)
        assert g0.keys() <= g1.keys() and all(not g1[n].any() for n in g1.keys() - g0.keys())
        for n in g0:
            assert rel_err(g1[n], g0[n]) < g_tol, n
    return ids, aid


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_a_compiled_model_trains_like_the_eager_one_in_one_graph(backend):
    """MultiLoraModel under torch.compile (Dynamo + AOTAutograd): one graph, no break in any
    layer; outputs and every LoRA gradient match eager for new compositions and shapes."""
    hk.set_backend(backend)
    m = _bert()
    counter = CompileCounter()
    ids, aid = _matches_eager(m, torch.compile(m, backend=counter), BATCHES, 0, 1e-6, 1e-5)
    # the model's forward is one frame (after the eager routing call); the first shape is
    # compiled static, the first new shape once more with dynamic sizes, then never again
    assert counter.frame_count == 2, counter.frame_count
    explain = torch._dynamo.explain(m)(input_ids=ids, adapter_ids=aid)
    assert explain.graph_break_count == 0, [b.reason for b in explain.break_reasons]
    assert explain.graph_count == 1


def test_new_alphas_are_data_not_a_new_graph():
    """A layer's scalings enter the graph as a host tensor: new alphas (FL rounds load new
    clients' adapters) do not recompile, and the compiled model computes with them."""
    hk.set_backend("torch")
    m = _bert()
    counter = CompileCounter()
    cm = torch.compile(m, backend=counter)
    ids, aid = torch.randint(0, 97, (3, 7)).to(DEV), torch.tensor([0, 2, 1])
    for alphas in ([8.0, 8.0, 8.0], [1.0, 4.0, 16.0], [2.5, 0.5, 32.0]):
        for _, layer in m.lora_layers():
            for k, alpha in enumerate(alphas):  # the same factors, another alpha
                rows = layer.layout.rows(k)
                layer.load_adapter(k, layer.lora_A[rows].detach().clone(), layer.lora_B[rows].detach().clone(),
                                   alpha=alpha)
        assert torch.equal(cm(input_ids=ids, adapter_ids=aid).last_hidden_state,
                           m(input_ids=ids, adapter_ids=aid).last_hidden_state)
    assert counter.frame_count == 1


def test_fullgraph_a_single_adapter_and_one_ids_tensor_for_every_length():
    """``fullgraph=True`` compiles (the routing runs in an eager frame before the graph); a
    one-adapter model called without ids, and one ids tensor reused over 12 sequence lengths,
    compile twice at most (static, then symbolic sizes) and match eager."""
    from transformers import BertConfig, BertModel

    from hetlora import MultiLoraModel

    hk.set_backend("torch")
    m = _bert()
    ids, aid = torch.randint(0, 97, (3, 7)).to(DEV), torch.tensor([0, 2, 1])
    full = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert torch.equal(full(input_ids=ids, adapter_ids=aid).last_hidden_state,
                       m(input_ids=ids, adapter_ids=aid).last_hidden_state)
    torch._dynamo.reset()
    counter = CompileCounter()
    cm = torch.compile(m, backend=counter)
    for L in range(4, 16):
        x = torch.randint(0, 97, (3, L)).to(DEV)
        assert torch.equal(cm(input_ids=x, adapter_ids=aid).last_hidden_state,
                           m(input_ids=x, adapter_ids=aid).last_hidden_state)
    assert counter.frame_count <= 2, counter.frame_count
    torch._dynamo.reset()
    torch.manual_seed(4)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    one = MultiLoraModel(BertModel(cfg).eval(), ["query", "value", "dense"], ranks=[3], alpha=8).to(DEV)
    counter = CompileCounter()
    cone = torch.compile(one, backend=counter)
    for B, L in ((3, 7), (2, 9), (4, 5), (3, 11)):
        x = torch.randint(0, 97, (B, L)).to(DEV)
        assert torch.equal(cone(input_ids=x).last_hidden_state, one(input_ids=x).last_hidden_state)
    assert counter.frame_count <= 2, counter.frame_count
    assert torch._dynamo.explain(one)(input_ids=x).graph_break_count == 0


def test_a_layer_alone_with_adapter_ids_compiles_once_for_every_mix():
    """`HetLoraLinear` called alone with ``adapter_ids`` (a list or a tensor): its groups are built
    in an eager frame, so a new mix of adapters is not a new graph."""
    from hetlora import HetLoraLinear

    hk.set_backend("torch")
    layer = HetLoraLinear(torch.nn.Linear(8, 6), ranks=[2, 3], alpha=4.0).to(DEV)
    with torch.no_grad():
        layer.lora_B.normal_()
    counter = CompileCounter()
    fn = torch.compile(lambda x, ids: layer(x, adapter_ids=ids), backend=counter)
    x = torch.randn(4, 5, 8).to(DEV)
    for ids in ([0, 1, 1, 0], [1, 1, 0, 0], [0, -1, 0, 1], [1, 0, 1, 0]):
        for form in (ids, torch.tensor(ids)):
            assert torch.equal(fn(x, form), layer(x, adapter_ids=form))
    assert counter.frame_count <= 2, counter.frame_count


def test_a_compiled_forward_that_raises_gives_the_routing_back():
    """The routing is set and given back in an eager frame: when the compiled model raises, a
    later call of the wrapped model without ids is refused, not served with the stale ids."""
    hk.set_backend("torch")
    m = _bert()
    cm = torch.compile(m, backend="aot_eager")
    ids, aid = torch.randint(0, 97, (3, 7)).to(DEV), torch.tensor([0, 2, 1])
    cm(input_ids=ids, adapter_ids=aid)
    with pytest.raises(IndexError):  # token ids past the vocabulary
        cm(input_ids=torch.full((3, 7), 500).to(DEV), adapter_ids=aid)
    assert m.routing.adapter_ids is None
    with pytest.raises(ValueError, match="adapter_ids is required"):
        m.model(input_ids=ids)


def test_inductor_compiles_the_model():
    """The default compiler end to end (Inductor's CPU code generation): close to eager."""
    hk.set_backend("torch")
    m = _bert(seed=1)
    _matches_eager(m, torch.compile(m), BATCHES[:2], 1, 1e-5, 1e-4)


def test_a_compiled_causal_lm_predicts_like_the_eager_one():
    """GPT-2's Conv1D layers take the lora_delta path (base layer + delta)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hetlora import MultiLoraModel

    hk.set_backend("torch")
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    m = MultiLoraModel(GPT2LMHeadModel(cfg), ["c_attn", "c_fc"], ranks=[4, 2], alpha=4).to(DEV).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    ids = torch.randint(0, 61, (2, 5)).to(DEV)
    aid = torch.tensor([1, 0])
    eager = m(input_ids=ids, adapter_ids=aid).logits
    compiled = torch.compile(m, backend="aot_eager", fullgraph=False)(input_ids=ids, adapter_ids=aid).logits
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_compiled_model_on_the_gpu(mode):
    """Triton kernels inside an Inductor graph on a GPU (and with its CUDA graphs): new
    compositions must not replay a stale schedule."""
    hk.set_backend("triton")
    m = _bert(seed=3)
    _matches_eager(m, torch.compile(m, mode=mode), BATCHES + BATCHES, 3, 1e-4, 1e-3)
