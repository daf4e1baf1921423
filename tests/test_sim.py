"""Simulation end to end on a tiny random BERT: outputs, validation of updates, resume, config errors."""

import json

import pytest
import torch

from hetlora.fl import FedConfig, Simulation
from hetlora.fl.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4,
                lr=1e-2, head_lr=1e-2, out_dir=str(tmp_path), run_name="run", checkpoint_every=1,
                export_clients=1, plots=False, tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"])
    base.update(kw)
    return FedConfig(**base)


def test_two_round_run_writes_outputs(tmp_path):
    hist = Simulation(_cfg(tmp_path, plots=True), verbose=False).run()
    d = tmp_path / "run"
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2] and len(hist.records) == 2
    for r in recs:
        assert {"train_loss", "eval_acc", "eval_loss", "client_ranks", "bytes_up", "bytes_down", "wall_time",
                "num_rejected"} <= set(r)
        assert 0.0 <= r["eval_acc"] <= 1.0 and len(r["client_ranks"]) == 6
        assert all(v > 0 for v in r["bytes_up"].values())
    assert FedConfig.from_json(d / "config.json") == _cfg(tmp_path, plots=True)
    ck = load_checkpoint(d, restore_rng=False)
    assert ck is not None and ck[0] == 2
    assert (d / "adapters" / "global" / "adapter_config.json").exists()
    assert (d / "accuracy.png").exists() and (d / "ranks_run.png").exists()


@pytest.mark.parametrize("strategy", ["hetlora", "flora", "fullft"])
def test_exported_global_adapter_loads_in_peft(tmp_path, strategy):
    """The exported global directory is the global model: peft's adapter on the base, plus, for
    strategies that change the base (FLoRA merges, full fine-tuning), target_weights.safetensors
    loaded into the base first."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from hetlora.fl.sim import tiny_bert

    sim = Simulation(_cfg(tmp_path, rounds=2, strategy=strategy), verbose=False)
    sim.run()
    sim.fm.load_global(sim.state)
    path = tmp_path / "run" / "adapters" / "global"
    base = tiny_bert(0)
    tw = path / "target_weights.safetensors"
    assert tw.exists() == (strategy != "hetlora")
    if tw.exists():
        missing, unexpected = base.load_state_dict(load_file(str(tw)), strict=False)
        assert not unexpected
    pm = PeftModel.from_pretrained(base, str(path))
    ids = torch.randint(4, 60, (2, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = sim.fm.features(ids, mask, torch.zeros(2, dtype=torch.int64))
        out = pm(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_a_rebuilt_run_keeps_its_state_through_setup_and_scores_as_reported(tmp_path):
    from hetlora.fl.local import evaluate

    hist = Simulation(_cfg(tmp_path, rounds=2, lam=5.0, gamma=0.5), verbose=False).run()
    sim = Simulation.from_run_dir(tmp_path / "run")
    A, ranks = [a.clone() for a in sim.state.A], sim.client_ranks.copy()
    assert list(ranks) == hist.records[-1]["client_ranks"]
    sim.setup()  # loads the data; must not re-initialise what the checkpoint restored
    assert all(torch.equal(a, b) for a, b in zip(sim.state.A, A))
    assert list(sim.client_ranks) == list(ranks)
    acc, loss = evaluate(sim.fm, sim.state, sim.data.test)
    assert acc == hist.records[-1]["eval_acc"]
    assert loss == pytest.approx(hist.records[-1]["eval_loss"], rel=1e-6)


def test_bad_updates_are_rejected_and_the_round_goes_on(tmp_path):
    sim = Simulation(_cfg(tmp_path, rounds=1, clients_per_round=5), verbose=False)

    def corrupt(rnd, ups):
        ups[0].A[0][0, 0] = float("nan")
        ups[1].B[1] = torch.zeros(ups[1].rank, 7)
        ups[2].rank = 99
        return ups

    sim.update_hook = corrupt
    hist = sim.run()
    rec = hist.records[0]
    assert rec["num_rejected"] == 3 and rec["num_accepted"] == 2
    reasons = {r["client"]: r["reason"] for r in rec["rejected"]}
    assert "non-finite" in reasons[rec["clients"][0]]
    assert "shape" in reasons[rec["clients"][1]]
    assert "outside" in reasons[rec["clients"][2]]
    assert all(torch.isfinite(t).all() for t in sim.state.A + sim.state.B + [sim.state.head_W])
    assert rec["eval_acc"] is not None


def test_all_updates_rejected_keeps_the_global_state(tmp_path):
    sim = Simulation(_cfg(tmp_path, rounds=1), verbose=False)
    sim.setup()
    before = [t.clone() for t in sim.state.A + sim.state.B]

    def kill(rnd, ups):
        for u in ups:
            u.head_b[0] = float("inf")
        return ups

    sim.update_hook = kill
    rec = sim.run_round(1)
    assert rec["num_accepted"] == 0 and rec["num_rejected"] == 3 and rec["failed"] is True
    for a, b in zip(before, sim.state.A + sim.state.B):
        assert torch.equal(a, b)


def test_round_fails_below_min_clients_and_leaves_model_and_ranks(tmp_path):
    # every client at r_max = 4, so that each sound update below really carries a pruned rank
    sim = Simulation(_cfg(tmp_path, rounds=2, clients_per_round=3, min_clients=3, tiers=[[1.0, "max"]]),
                     verbose=False)
    sim.setup()
    before = [t.clone() for t in sim.state.A + sim.state.B + [sim.state.head_W, sim.state.head_b]]
    ranks_before = sim.client_ranks.copy()
    assert (ranks_before == 4).all()

    def one_bad(rnd, ups):
        for u in ups:  # pruned by one rank, factors and all (sound updates): the ranks must not stick
            u.rank = u.rank_received - 1
            u.A, u.B = [a[:u.rank].clone() for a in u.A], [b[:u.rank].clone() for b in u.B]
        ups[0].A[0][0, 0] = float("nan")
        return ups

    sim.update_hook = one_bad
    rec = sim.run_round(1)
    assert rec["failed"] is True and rec["num_accepted"] == 2 and rec["num_rejected"] == 1
    assert rec["rejected"][0]["client"] == rec["clients"][0]
    assert rec["ranks_sent"][1:] == [3, 3]  # the two accepted updates were pruned
    for a, b in zip(before, sim.state.A + sim.state.B + [sim.state.head_W, sim.state.head_b]):
        assert torch.equal(a, b)
    assert (sim.client_ranks == ranks_before).all()
    # with every update sound the same config aggregates
    sim.update_hook = None
    rec2 = sim.run_round(2)
    assert rec2["failed"] is False and rec2["num_accepted"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, sim.state.A + sim.state.B))


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_resume_gives_the_uninterrupted_result(tmp_path, strategy):
    full = Simulation(_cfg(tmp_path / "a", rounds=3, strategy=strategy, lam=0.5, gamma=0.6), verbose=False)
    full.run()

    crashed = Simulation(_cfg(tmp_path / "b", rounds=3, strategy=strategy, lam=0.5, gamma=0.6), verbose=False)

    def die(rnd, ups):
        if rnd == 3:
            raise _Crash("killed")
        return ups

    crashed.update_hook = die
    with pytest.raises(_Crash):
        crashed.run()
    assert load_checkpoint(tmp_path / "b" / "run", restore_rng=False)[0] == 2
    resumed = Simulation(_cfg(tmp_path / "b", rounds=3, strategy=strategy, lam=0.5, gamma=0.6), verbose=False)
    hist = resumed.run(resume=True)
    assert [r["round"] for r in hist.records] == [1, 2, 3]
    for x, y in zip(full.state.A + full.state.B + [full.state.head_W], resumed.state.A + resumed.state.B
                    + [resumed.state.head_W]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert list(full.client_ranks) == list(resumed.client_ranks)


@pytest.mark.parametrize("field,value", [
    ("min_clients", 0), ("min_clients", 9),
    ("strategy", "fedprox"), ("gamma", 1.0), ("lam", -1.0), ("r_max", 0), ("clients_per_round", 100),
    ("dirichlet_alpha", 0.0), ("mode", "parallel"), ("scaling_rule", "alpha"), ("tiers", [[0.5, 2]]),
    ("ranks", [1, 2]), ("batch_size", 0), ("lr", float("nan")), ("aggregation", "global"), ("partition", "x"),
    ("text_column", ["text"]), ("label_column", None), ("text_column", ""), ("seed", 2**64), ("seed", -1),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"FedConfig\.{field}"):
        FedConfig(**{field: value})


def test_config_roundtrip_json_yaml(tmp_path):
    cfg = FedConfig(strategy="flexlora", tiers="0.6:min,0.4:max", target_modules="query,key")
    assert cfg.tiers == [[0.6, "min"], [0.4, "max"]] and cfg.target_modules == ["query", "key"]
    cfg.to_yaml(tmp_path / "c.yaml")
    cfg.to_json(tmp_path / "c.json")
    assert FedConfig.load(tmp_path / "c.yaml") == cfg == FedConfig.load(tmp_path / "c.json")
    with pytest.raises(ValueError, match="unknown field"):
        FedConfig.from_dict({"rounds": 2, "bogus": 1})


def test_pruned_ranks_stick_across_rounds(tmp_path):
    sim = Simulation(_cfg(tmp_path, num_clients=3, clients_per_round=3, rounds=3, lam=5.0, gamma=0.5, r_min=1,
                          rank_rule="list", ranks=[4, 4, 2], local_steps=3, eval_every=10), verbose=False)
    hist = sim.run()
    r1, r2, r3 = hist.records
    # round 1: B starts at zero, the tail product at receipt is 0 and cannot fall below it
    assert r1["ranks_sent"] == r1["ranks_received"] == [4, 4, 2]
    pruned = [k for k in range(3) if r2["ranks_sent"][k] < r2["ranks_received"][k]]
    assert pruned, "a strong regulariser must make some client prune in round 2"
    for k in pruned:
        assert r2["ranks_sent"][k] == max(1, int(0.5 * r2["ranks_received"][k]))
        assert r2["client_ranks"][r2["clients"][k]] == r2["ranks_sent"][k]
        assert r3["ranks_received"][k] == r2["ranks_sent"][k]  # the new rank sticks


def test_backend_field_routes_every_op_and_gives_the_same_round(tmp_path, monkeypatch):
    """FedConfig.backend="cuda" (the C++ CPU ops here) runs local training, aggregation and
    evaluation on that backend, and the round agrees with the torch backend in float64."""
    import hetlora_kernels.ops as ops

    if not __import__("hetlora_kernels").backend_status("cuda", "cpu")[0]:
        pytest.fail("the C++ extension hetlora_kernels._C is not built: run scripts/setup.sh")
    used = []
    real = ops.resolve

    def spy(op, device, work=None):
        name, impl = real(op, device, work)
        used.append((op, name))
        return name, impl

    monkeypatch.setattr(ops, "resolve", spy)
    states = {}
    for backend in ("torch", "cuda"):
        used.clear()
        sim = Simulation(_cfg(tmp_path / backend, rounds=1, dtype="float64", backend=backend), verbose=False)
        sim.setup()
        sim.run_round(1)
        states[backend] = sim.state
        assert used and {name for _, name in used} == {backend}, used
        ops_used = {op for op, _ in used}
        assert {"delta_fro_norms", "weighted_aggregate"} <= ops_used and ops_used & {"lora_linear", "lora_delta"}
    a, b = states["torch"], states["cuda"]
    for x, y in zip(a.A + a.B + [a.head_W], b.A + b.B + [b.head_W]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


def test_backend_that_cannot_run_is_refused_naming_the_field(tmp_path, monkeypatch):
    import hetlora_kernels

    monkeypatch.setattr(hetlora_kernels, "backend_status", lambda name, device: (False, "the extension is not built"))
    with pytest.raises(ValueError, match="FedConfig.backend: 'cuda' cannot run on cpu: the extension is not built"):
        Simulation(_cfg(tmp_path, backend="cuda"), verbose=False).setup()
    with pytest.raises(ValueError, match="FedConfig.backend"):
        FedConfig(backend="tpu")
