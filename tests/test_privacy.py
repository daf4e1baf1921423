"""Client-level DP (DP-FedAvg, `hetlora.fl.privacy`): clipping, the noisy uniform mean, the noise
scale, the RDP accountant wrapper, config errors, and a 2-round tiny simulation with DP on.

opacus is a test dependency (requirements/dev.txt): it is imported at the top on purpose, so a
missing opacus fails this module loudly instead of skipping it.
"""

import json
import math
import sys

import opacus  # noqa: F401  (a hard requirement of these tests: fail, never skip)
import pytest
import torch
from opacus.accountants import RDPAccountant

from hetlora.fl import FedConfig, Simulation
from hetlora.fl.privacy import (
    client_delta,
    clip_update,
    dp_aggregate,
    dp_generator,
    epsilon,
    flat_state,
    noisy_mean,
    round_epsilon,
)
from hetlora.fl.strategies import ClientUpdate, GlobalState

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = [(5, 6), (4, 7)]  # (d_in, d_out) per layer
C, D = 3, 4  # head: classes, features
R_G = 4  # global rank


def _cfg(**kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=8, clients_per_round=4, r_min=1,
                r_max=R_G, tiers=[[0.5, "min"], [0.5, "max"]], progress=False, dp_clip=1.0)
    base.update(kw)
    return FedConfig(**base)


def _state(gen):
    A = [torch.randn(R_G, di, generator=gen, dtype=torch.float64) for di, _ in DIMS]
    B = [torch.randn(R_G, do, generator=gen, dtype=torch.float64) for _, do in DIMS]
    return GlobalState(A, B, 1.0, torch.randn(C, D, generator=gen, dtype=torch.float64),
                       torch.randn(C, generator=gen, dtype=torch.float64))


def _update(state, cid, received, sent, scale, gen):
    """What a client that got rows 0:received and trained might send back (rows 0:sent)."""
    return ClientUpdate(
        client_id=cid, rank=sent, rank_received=received,
        A=[(a[:sent] + scale * torch.randn(sent, a.shape[1], generator=gen, dtype=torch.float64)) for a in state.A],
        B=[(b[:sent] + scale * torch.randn(sent, b.shape[1], generator=gen, dtype=torch.float64)) for b in state.B],
        scaling=1.0, head_W=state.head_W + scale * torch.randn(C, D, generator=gen, dtype=torch.float64),
        head_b=state.head_b + scale * torch.randn(C, generator=gen, dtype=torch.float64), num_examples=10 * (cid + 1))


def _ref_delta(state, u):
    """Δ_k written out: zero-padded sent minus zero-padded received, then the head."""
    out = []
    for G, X in ((state.A, u.A), (state.B, u.B)):
        for g, x in zip(G, X):
            sent = torch.zeros(R_G, g.shape[1], dtype=torch.float64)
            sent[: u.rank] = x
            recv = torch.zeros(R_G, g.shape[1], dtype=torch.float64)
            recv[: u.rank_received] = g[: u.rank_received]
            out.append(sent - recv)
    return out + [u.head_W - state.head_W, u.head_b - state.head_b]


def _ref_clip(ts, S):
    n = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    return [t.double() * min(1.0, S / n) for t in ts], n


# -- clipping ------------------------------------------------------------------------------------------
def test_client_delta_pads_truncates_and_keeps_pruned_rows_as_minus_received():
    g = torch.Generator().manual_seed(1)
    st = _state(g)
    ups = [_update(st, 0, 4, 4, 0.1, g), _update(st, 1, 3, 2, 0.1, g), _update(st, 2, 1, 1, 0.1, g)]
    for u in ups:
        d = client_delta(st, u)
        for got, ref in zip(d, _ref_delta(st, u)):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # the pruned client (received 3, sent 2): row 2 of its update is -received, row 3 is untouched (0)
    d = client_delta(st, ups[1])
    torch.testing.assert_close(d[0][2], -st.A[0][2], rtol=0, atol=0)
    assert float(d[0][3].abs().max()) == 0.0
    with pytest.raises(ValueError, match="ranks"):
        client_delta(st, _update(st, 3, 2, 3, 0.1, g))  # sent above received


def test_clip_against_float64_reference():
    g = torch.Generator().manual_seed(2)
    for scale in (1e-3, 0.05, 1.0, 30.0):
        ts = [scale * torch.randn(5, 6, generator=g, dtype=torch.float64),
              scale * torch.randn(7, generator=g, dtype=torch.float64),
              scale * torch.randn(3, 4, generator=g, dtype=torch.float32)]
        S = 0.7
        got, norm, was = clip_update(ts, S)
        ref, ref_norm = _ref_clip(ts, S)
        assert norm == pytest.approx(ref_norm, rel=1e-12)
        assert was == (ref_norm > S)
        new_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in got))
        assert new_norm <= S * (1 + 1e-12)  # norm over all tensors together <= S
        if was:
            assert new_norm == pytest.approx(S, rel=1e-12)
        for a, r, t in zip(got, ref, ts):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, r, rtol=1e-12, atol=0)  # same direction, factor min(1, S/n)
            if not was:
                assert torch.equal(a, t.double())  # small updates untouched, bit for bit
    with pytest.raises(ValueError, match="clip"):
        clip_update(ts, 0.0)


# -- the aggregate -------------------------------------------------------------------------------------
def test_sigma_zero_aggregate_is_the_uniform_mean_of_clipped_deltas():
    g = torch.Generator().manual_seed(3)
    st = _state(g)
    # K = clients_per_round = 4 sampled, 3 accepted: the denominator stays 4 (fixed)
    ups = [_update(st, 0, 4, 4, 0.01, g), _update(st, 1, 3, 2, 1.0, g), _update(st, 5, 2, 2, 5.0, g)]
    cfg = _cfg(dp_clip=0.8, dp_noise_multiplier=0.0)
    new, info = dp_aggregate(st, ups, cfg, round_idx=1)
    total = None
    n_clipped = 0
    for u in ups:
        c, n = _ref_clip(_ref_delta(st, u), 0.8)
        n_clipped += n > 0.8
        total = c if total is None else [a + b for a, b in zip(total, c)]
    ref_mean = [t / 4 for t in total]
    for after, before, m in zip(flat_state(new), flat_state(st), ref_mean):
        torch.testing.assert_close(after - before, m, rtol=1e-12, atol=1e-12)
    assert info["dp_clipped"] == n_clipped == 2
    # data sizes and HetLoRA sparsity weights are not used: permuting num_examples changes nothing
    for u, n in zip(ups, (999, 1, 7)):
        u.num_examples = n
    new2, _ = dp_aggregate(st, ups, cfg, round_idx=1)
    for a, b in zip(flat_state(new), flat_state(new2)):
        assert torch.equal(a, b)
    assert new.scaling == st.scaling and new.rank == st.rank


def test_noise_has_std_sigma_S_over_K_and_mean_zero():
    g = torch.Generator().manual_seed(4)
    n = 400_000
    deltas = [[torch.randn(n, generator=g, dtype=torch.float64) * 1e-3] for _ in range(3)]
    sigma, S, K = 0.8, 0.5, 4
    noiseless, _ = noisy_mean(deltas, S, 0.0, K, None)
    noisy, _ = noisy_mean(deltas, S, sigma, K, dp_generator(7, 3))
    diff = noisy[0] - noiseless[0]
    target = sigma * S / K
    # std of the sample std ~ target / sqrt(2n) (0.11 %): 1 % is > 8 standard errors
    assert float(diff.std()) == pytest.approx(target, rel=0.01)
    assert abs(float(diff.mean())) < 6 * target / math.sqrt(n)
    # the noise is a pure function of (seed, round): same draw again, another round differs
    again, _ = noisy_mean(deltas, S, sigma, K, dp_generator(7, 3))
    assert torch.equal(again[0], noisy[0])
    other, _ = noisy_mean(deltas, S, sigma, K, dp_generator(7, 4))
    assert not torch.equal(other[0], noisy[0])


def test_dp_aggregate_adds_exactly_the_seeded_noise_to_every_tensor():
    g = torch.Generator().manual_seed(5)
    st = _state(g)
    ups = [_update(st, k, 4, 3, 0.5, g) for k in range(4)]
    cfg0 = _cfg(dp_clip=0.3, dp_noise_multiplier=0.0, seed=11)
    cfg = _cfg(dp_clip=0.3, dp_noise_multiplier=2.0, seed=11)
    base, _ = dp_aggregate(st, ups, cfg0, round_idx=6)
    noisy, _ = dp_aggregate(st, ups, cfg, round_idx=6)
    gen = dp_generator(11, 6)
    for a, b in zip(flat_state(noisy), flat_state(base)):  # every tensor, every row (untouched rows too)
        expect = 2.0 * 0.3 * torch.randn(a.shape, generator=gen, dtype=torch.float64) / 4
        torch.testing.assert_close(a - b, expect, rtol=1e-9, atol=1e-12)


def test_dp_aggregate_keeps_the_state_dtype():
    g = torch.Generator().manual_seed(6)
    st64 = _state(g)
    st = GlobalState([a.float() for a in st64.A], [b.float() for b in st64.B], 1.0, st64.head_W.float(),
                     st64.head_b.float())
    ups = [_update(st64, k, 4, 4, 0.1, g) for k in range(2)]
    new, _ = dp_aggregate(st, ups, _cfg(), round_idx=1)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in flat_state(new))


# -- accounting ------------------------------------------------------------------------------------------
def test_epsilon_matches_opacus_driven_directly():
    for sigma, q, steps, delta in [(1.0, 0.4, 10, 1e-5), (0.7, 0.05, 100, 1e-6), (3.0, 1.0, 3, 1e-3)]:
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-12)
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 3, 1e-5) == math.inf


def test_epsilon_falls_with_sigma_and_grows_with_rounds():
    by_sigma = [epsilon(s, 0.1, 50, 1e-5) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    by_rounds = [epsilon(1.0, 0.1, t, 1e-5) for t in (1, 2, 5, 20, 100)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    cfg = _cfg(num_clients=20, clients_per_round=5, dp_noise_multiplier=1.2, dp_delta=1e-4)
    assert round_epsilon(cfg, 7) == epsilon(1.2, 0.25, 7, 1e-4)


def test_missing_opacus_raises_an_import_error_naming_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # makes `from opacus.accountants import` fail
    with pytest.raises(ImportError, match="pip install opacus"):
        epsilon(1.0, 0.1, 5, 1e-5)


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("dp_clip", 0.0), ("dp_clip", -1.0), ("dp_clip", float("nan")),
                                         ("dp_clip", "1"), ("dp_noise_multiplier", -0.1),
                                         ("dp_noise_multiplier", float("inf")), ("dp_delta", 0.0),
                                         ("dp_delta", 1.0), ("dp_delta", 1.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"FedConfig.{field}"):
        _cfg(**{field: value})


@pytest.mark.parametrize("strategy", ["flora", "flexlora", "fullft"])
def test_dp_with_a_non_padded_strategy_is_refused(strategy):
    with pytest.raises(ValueError, match=f"FedConfig.dp_clip.*{strategy}"):
        _cfg(strategy=strategy)
    _cfg(strategy=strategy, dp_clip=None)  # DP off: fine


def test_dp_defaults_off_and_padded_strategies_accept_it():
    assert FedConfig().dp_clip is None
    for s in ("hetlora", "homlora", "zeropad"):
        c = _cfg(strategy=s, dp_clip=2, dp_noise_multiplier=0)
        assert c.dp_clip == 2.0 and isinstance(c.dp_clip, float) and c.dp_noise_multiplier == 0.0


def test_cli_exposes_the_dp_fields():
    from hetlora.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["simulate"]
    helptext = sub.format_help()
    for flag in ("--dp-clip", "--dp-noise-multiplier", "--dp-delta", "--norm-cap"):
        assert flag in helptext
    ns = p.parse_args(["simulate", "--dp-clip", "0.5", "--dp-noise-multiplier", "1.1", "--dp-delta", "1e-6"])
    assert (ns.dp_clip, ns.dp_noise_multiplier, ns.dp_delta) == (0.5, 1.1, 1e-6)


# -- end to end ------------------------------------------------------------------------------------------
def _sim_cfg(tmp_path, name, **kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4, lr=1e-2, head_lr=1e-2, out_dir=str(tmp_path), run_name=name,
                checkpoint_every=1, export_clients=0, plots=False, tiers=[[0.5, "min"], [0.5, "max"]],
                target_modules=["query", "value"], dp_clip=0.05, dp_noise_multiplier=0.5, dp_delta=1e-5)
    base.update(kw)
    return FedConfig(**base)


def test_two_round_simulation_with_dp_is_finite_reproducible_and_logs_epsilon(tmp_path):
    sims, lines = [], []
    for name in ("a", "b"):
        sim = Simulation(_sim_cfg(tmp_path, name), verbose=False)
        sim.run()
        sims.append(sim)
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    cfg = sims[0].config
    for r in recs:
        assert r["dp_epsilon"] == pytest.approx(epsilon(0.5, 3 / 6, r["round"], 1e-5), rel=1e-12)
        assert 0 <= r["dp_clipped"] <= r["num_accepted"]
        lines.append(sims[0]._line({**r, "elapsed": 0.0}))
    assert recs[0]["dp_epsilon"] < recs[1]["dp_epsilon"]
    assert recs[0]["dp_clipped"] >= 1  # S = 0.05 is below a round's update norm: clipping is exercised
    assert all("ε" in line for line in lines)
    a, b = (flat_state(s.state) for s in sims)
    assert all(torch.isfinite(t).all() for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed -> bitwise the same state
    assert cfg.dp_clip == 0.05
    # resume: round 1 alone, then resume to round 2 -> the same state as the uninterrupted run
    Simulation(_sim_cfg(tmp_path, "c", rounds=1), verbose=False).run()
    sim_c = Simulation(_sim_cfg(tmp_path, "c"), verbose=False)
    sim_c.run(resume=True)
    assert all(torch.equal(x, y) for x, y in zip(flat_state(sim_c.state), a))


def test_dp_off_leaves_records_without_dp_fields(tmp_path):
    sim = Simulation(_sim_cfg(tmp_path, "off", dp_clip=None, rounds=1), verbose=False)
    rec = sim.run().records[0]
    assert "dp_epsilon" not in rec and "dp_clipped" not in rec


@pytest.mark.parametrize("strategy", ["homlora", "zeropad"])
def test_one_dp_round_for_the_other_padded_strategies(tmp_path, strategy):
    sim = Simulation(_sim_cfg(tmp_path, strategy, strategy=strategy, rounds=1, client_eval_samples=0,
                              dp_noise_multiplier=0.0), verbose=False)
    rec = sim.run().records[0]
    assert rec["dp_epsilon"] is None  # σ = 0: no finite ε (written as null)
    assert rec["dp_clipped"] >= 1 and all(torch.isfinite(t).all() for t in flat_state(sim.state))
    assert "ε inf" in sim._line({**rec, "elapsed": 0.0})
