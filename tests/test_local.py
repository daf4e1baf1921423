"""Concurrent local training: parity with sequential, per-client optimiser masking."""

import numpy as np
import pytest
import torch

from hetlora.fl import FedConfig, Simulation
from hetlora.fl.local import ClientAdamW, ClientSampler
from hetlora.fl.sim import FedData, synthetic_data, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(num_clients=4, seed=0):
    train, test, C = synthetic_data(seed, num_train=120, num_test=24, length=12)
    rng = np.random.default_rng(0)
    parts = np.array_split(rng.permutation(len(train)), num_clients)
    # unequal client sizes: with local_epochs, clients run different numbers of steps
    sizes = [10, 20, 40, 50][:num_clients]
    perm = rng.permutation(len(train))
    parts, s = [], 0
    for n in sizes:
        parts.append(np.sort(perm[s:s + n]))
        s += n
    clients = [(p[:-2], p[-2:]) for p in parts]
    return FedData(train, test, C, clients)


def _cfg(mode, strategy="hetlora", **kw):
    base = dict(strategy=strategy, model="tiny-random-bert", dataset="synthetic", num_clients=4, clients_per_round=4,
                rounds=1, local_steps=4, local_epochs=1.0, batch_size=4, r_min=1, r_max=4, rank_rule="list",
                ranks=[1, 2, 3, 4], dtype="float64", mode=mode, progress=False, lr=5e-2, head_lr=5e-2,
                lam=0.5, gamma=0.7, max_grad_norm=0.05, weight_decay=0.01, client_eval_samples=2,
                target_modules=["query", "value", "dense"], out_dir="unused", checkpoint_every=0)
    base.update(kw)
    return FedConfig(**base)


def _one_round(cfg, data):
    sim = Simulation(cfg, data=data, encoder=tiny_bert(0, dtype=torch.float64), verbose=False)
    sim.setup()
    rec = sim.run_round(1)
    return sim, rec


@pytest.mark.parametrize("strategy", ["hetlora", "flora"])
def test_concurrent_equals_sequential_after_one_round(strategy):
    data = _data()
    sims = {m: _one_round(_cfg(m, strategy), data) for m in ("concurrent", "sequential")}
    (sc, rc), (ss, rs) = sims["concurrent"], sims["sequential"]
    # clients did run different numbers of steps (masking was exercised)
    assert len({sc._steps(len(tr)) for tr, _ in data.clients}) > 1
    assert rc["ranks_sent"] == rs["ranks_sent"]
    assert rc["client_ranks"] == rs["client_ranks"]
    a, b = sc.state, ss.state
    for x, y in zip(a.A + a.B + [a.head_W, a.head_b], b.A + b.B + [b.head_W, b.head_b]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    if a.base_weights is not None:
        for x, y in zip(a.base_weights, b.base_weights):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    assert abs(rc["train_loss"] - rs["train_loss"]) < 1e-9
    assert rc["client_acc"] == rs["client_acc"]
    # the round actually moved the global model
    assert float(a.head_W.sub(sc.init_state(data.num_classes).head_W).abs().max()) > 1e-4


@pytest.mark.parametrize("mode", ["concurrent", "sequential"])
def test_the_head_trains_at_head_lr_and_the_adapter_at_lr(mode):
    """Adam's first step moves every entry with a gradient by about its lr: one client, one
    step, the round's global model is that client's, so its moves show which lr each part got."""
    data = _data()
    cfg = _cfg(mode, clients_per_round=1, local_steps=1, lr=5e-2, head_lr=1e-3, weight_decay=0.0, max_grad_norm=0.0,
               lam=0.0)
    sim = Simulation(cfg, data=data, encoder=tiny_bert(0, dtype=torch.float64), verbose=False)
    sim.setup()
    head0, B0 = sim.state.head_W.clone(), [b.clone() for b in sim.state.B]
    sim.run_round(1)
    dh = float((sim.state.head_W - head0).abs().max())
    db = max(float((b - b0).abs().max()) for b, b0 in zip(sim.state.B, B0))
    assert 0.5e-3 < dh <= 1.001e-3
    assert 2.5e-2 < db <= 5.001e-2


def test_adamw_masks_finished_clients():
    torch.manual_seed(0)
    owner = torch.tensor([0, 0, 1, 1, 1])
    p = torch.randn(5, 3, dtype=torch.float64)
    opt = ClientAdamW([p], [owner], [0.1], 2, weight_decay=0.1)
    opt.step([torch.randn(5, 3, dtype=torch.float64)], torch.tensor([True, True]))
    m, v = opt.moments(0)
    assert m.shape == v.shape == p.shape and m.abs().min() > 0
    snap = (p[2:].clone(), m[2:].clone(), v[2:].clone())
    before0 = (p[:2].clone(), m[:2].clone())
    opt.step([torch.randn(5, 3, dtype=torch.float64)], torch.tensor([True, False]))
    m, v = opt.moments(0)
    assert torch.equal(p[2:], snap[0]) and torch.equal(m[2:], snap[1]) and torch.equal(v[2:], snap[2])
    assert not torch.equal(p[:2], before0[0]) and not torch.equal(m[:2], before0[1])
    assert opt.steps.tolist() == [2, 1]


def test_adamw_matches_torch_adamw_per_client():
    """Each client's rows follow torch.optim.AdamW with its own step count."""
    torch.manual_seed(1)
    owner = torch.tensor([0, 1, 1])
    p = torch.randn(3, 4, dtype=torch.float64)
    refs = [torch.nn.Parameter(p[0:1].clone()), torch.nn.Parameter(p[1:3].clone())]
    topt = [torch.optim.AdamW([r], lr=0.05, weight_decay=0.02) for r in refs]
    opt = ClientAdamW([p], [owner], [0.05], 2, weight_decay=0.02)
    actives = [[True, True], [False, True], [True, True], [True, False]]
    for act in actives:
        g = torch.randn(3, 4, dtype=torch.float64)
        opt.step([g], torch.tensor(act))
        for k, (sl, r) in enumerate(zip([slice(0, 1), slice(1, 3)], refs)):
            if act[k]:
                r.grad = g[sl].clone()
                topt[k].step()
    torch.testing.assert_close(p[0:1], refs[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p[1:3], refs[1].detach(), rtol=1e-12, atol=1e-12)


def _clip_f64(gs, owners, K, max_norm):
    sq = torch.zeros(K, dtype=torch.float64)
    for g, own in zip(gs, owners):
        sq.index_add_(0, own, g.double().pow(2).reshape(g.shape[0], -1).sum(1))
    coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    return [g * coef[own].view((-1,) + (1,) * (g.dim() - 1)) for g, own in zip(gs, owners)]


# 0: no clipping; 0.3: every client clipped; 1e3: none is (the coefficient is capped at 1)
@pytest.mark.parametrize("max_norm", [0.0, 0.3, 1e3])
def test_grouped_adamw_matches_torch_adamw_per_tensor_and_client(max_norm):
    """Tensors of one shape, dtype, lr and owner are updated stacked; every (tensor, client) slice
    still follows its own torch.optim.AdamW, with per-client clipping over all its rows."""
    g0 = torch.Generator().manual_seed(3)
    own_a = torch.tensor([0, 0, 1, 2, 2])  # shared by four tensors, two lrs
    own_h = torch.tensor([0, 1, 2])
    shapes = [(5, 4), (5, 4), (5, 4), (3, 2, 4), (5, 4)]
    owners = [own_a, own_a, own_a, own_h, own_a]
    lrs = [0.05, 0.05, 0.01, 0.02, 0.05]
    params = [torch.randn(s, generator=g0, dtype=torch.float64) for s in shapes]
    opt = ClientAdamW(params, owners, lrs, 3, weight_decay=0.03)
    assert opt.groups == [[0, 1, 4], [2], [3]]
    refs, topts = {}, {}
    for j, (p, own, lr) in enumerate(zip(params, owners, lrs)):
        for k in range(3):
            rows = [i for i in range(p.shape[0]) if int(own[i]) == k]
            refs[j, k] = torch.nn.Parameter(p[rows].clone())
            topts[j, k] = torch.optim.AdamW([refs[j, k]], lr=lr, weight_decay=0.03)
    for act in [[True, True, True], [True, False, True], [False, True, True], [True, True, False]]:
        gs = [torch.randn(p.shape, generator=g0, dtype=torch.float64) for p in params]
        opt.step(gs, torch.tensor(act), max_grad_norm=max_norm)
        ref_gs = _clip_f64(gs, owners, 3, max_norm) if 0 < max_norm < 1e3 else gs
        for (j, k), r in refs.items():
            if act[k]:
                rows = [i for i in range(params[j].shape[0]) if int(owners[j][i]) == k]
                r.grad = ref_gs[j][rows].clone()
                topts[j, k].step()
    for (j, k), r in refs.items():
        rows = [i for i in range(params[j].shape[0]) if int(owners[j][i]) == k]
        torch.testing.assert_close(params[j][rows], r.detach(), rtol=1e-12, atol=1e-12)


def test_adamw_skips_a_tensor_without_gradient_even_inside_a_group():
    torch.manual_seed(4)
    own = torch.tensor([0, 1])
    ps = [torch.randn(2, 3, dtype=torch.float64) for _ in range(3)]
    opt = ClientAdamW(ps, [own] * 3, [0.1] * 3, 2)
    assert opt.groups == [[0, 1, 2]]
    opt.step([torch.randn(2, 3, dtype=torch.float64) for _ in range(3)], torch.tensor([True, True]))
    snap = [(p.clone(), *(t.clone() for t in opt.moments(j))) for j, p in enumerate(ps)]
    opt.step([torch.randn(2, 3, dtype=torch.float64), None, torch.randn(2, 3, dtype=torch.float64)],
             torch.tensor([True, True]), max_grad_norm=0.5)
    after = [(p, *opt.moments(j)) for j, p in enumerate(ps)]
    assert all(torch.equal(a, b) for a, b in zip(after[1], snap[1]))
    for j in (0, 2):
        assert all(not torch.equal(a, b) for a, b in zip(after[j], snap[j]))


def _ops_of_a_step(n_tensors: int) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    own = torch.tensor([0, 0, 1])
    ps = [torch.randn(3, 8) for _ in range(n_tensors)]
    opt = ClientAdamW(ps, [own] * n_tensors, [0.1] * n_tensors, 2, weight_decay=0.01)
    gs = [torch.randn(3, 8) for _ in range(n_tensors)]
    with Count():
        opt.step(gs, torch.tensor([True, False]), max_grad_norm=1.0)
    return Count.n


def test_adamw_step_costs_the_same_ops_for_any_number_of_alike_tensors():
    # on a GPU each op is a launch that costs the host tens of microseconds: a step over every
    # layer's A and B must not cost one pass per tensor
    assert _ops_of_a_step(24) == _ops_of_a_step(2) < 64


def test_adamw_refuses_mismatched_arguments():
    p = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="one entry per tensor"):
        ClientAdamW([p], [torch.zeros(3, dtype=torch.int64)], [0.1, 0.2], 2)
    with pytest.raises(ValueError, match=r"owners\[0\] must be \[rows\] = \[3\]"):
        ClientAdamW([p], [torch.zeros(2, dtype=torch.int64)], [0.1], 2)
    opt = ClientAdamW([p], [torch.zeros(3, dtype=torch.int64)], [0.1], 2)
    with pytest.raises(ValueError, match="grads must have one entry per parameter"):
        opt.step([], torch.tensor([True, True]))


def test_sampler_is_a_function_of_seed_round_client():
    idx = np.arange(100, 130)
    a = [ClientSampler(idx, 8, 3, 2, 5).next() for _ in range(1)][0]
    b = ClientSampler(idx, 8, 3, 2, 5).next()
    c = ClientSampler(idx, 8, 3, 3, 5).next()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    s = ClientSampler(np.arange(3), 8, 0, 1, 1)
    assert len(s.next()) == 3  # batch capped at the client's size


def test_concurrent_steps_reuse_the_token_groups(monkeypatch):
    """Steps with the same clients and batch sizes pass one ids tensor, so the model's routing
    builds TokenGroups once per (clients, batch sizes, trimmed length), not once per step;
    the round's result is the one test_concurrent_equals_sequential_after_one_round checks."""
    import hetlora.layer as layer_mod

    keys = []
    real = layer_mod.TokenGroups.from_adapter_ids

    def counted(ids, K):
        keys.append((K, ids.numel()))
        return real(ids, K)

    monkeypatch.setattr(layer_mod.TokenGroups, "from_adapter_ids", staticmethod(counted))
    data = _data()
    cfg = _cfg("concurrent", local_steps=6, local_epochs=None)
    sim = Simulation(cfg, data=data, encoder=tiny_bert(0, dtype=torch.float64), verbose=False)
    sim.setup()
    keys.clear()
    sim.run_round(1)
    # 6 training steps, every client active with batch 4, every sequence of the synthetic data
    # 12 tokens long: one build for all of them (it was one per step), then evaluation's
    assert keys[0] == (4, 4 * 4 * 12) and keys.count(keys[0]) == 1, keys
    assert len(keys) <= 3, keys  # + the local evaluation's and the global evaluation's batches


@pytest.mark.parametrize("model,extra", [("tiny-random-bert", {"lora_dropout": 0.2}),
                                         ("tiny-random-gpt2", {"task": "causal-lm", "target_modules": ["c_attn"]})])
def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, model, extra):
    """``FedConfig.gradient_checkpointing``: the frozen model's blocks are recomputed in the
    backward (each adapted layer runs twice a step), and a run ends exactly where the run without
    it does, LoRA dropout included (the recomputation replays the RNG)."""
    from tests.helpers import tiny_run_config

    def run(ckpt: bool, name: str):
        cfg = tiny_run_config(tmp_path, model=model, run_name=name, gradient_checkpointing=ckpt, rounds=2,
                              checkpoint_every=0, **extra)
        sim = Simulation(cfg, verbose=False)
        sim.setup()
        calls = []
        layer = sim.fm.layers[0]
        hook = layer.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
        hist = sim.run(overwrite=True)
        hook.remove()
        return sim, hist, calls

    plain, hist0, calls0 = run(False, "plain")
    ckpt, hist1, calls1 = run(True, "ckpt")
    for a, b in zip(plain.state.A + plain.state.B, ckpt.state.A + ckpt.state.B):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in hist0.records] == [r["train_loss"] for r in hist1.records]
    assert len(calls1) > len(calls0)  # the recomputations


def test_gradient_checkpointing_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="gradient_checkpointing: cannot go with cuda_graphs"):
        FedConfig(device="cuda", cuda_graphs=True, gradient_checkpointing=True).validate()
    from hetlora.fl.local import FedModel

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="gradient_checkpointing: Sequential does not support"):
        FedModel(plain, ["0"], gradient_checkpointing=True)
