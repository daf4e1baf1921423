"""hetlora on Flower (flwr 1.42): the strategy's hooks on hand-built messages, in-process runs
(a fake grid and Flower's Ray simulation engine) against the simulator, and a real deployment
(superlink + supernodes on loopback).  CPU, tiny random BERT, synthetic data, no network."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# flwr is installed by scripts/setup.sh: a missing flwr fails these tests, it never skips them
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402

from hetlora.fl import FedConfig, Simulation  # noqa: E402
from hetlora.flower import FlowerStrategy, fedconfig_from_run_config, make_client_app, make_server_app  # noqa: E402
from hetlora.flower.serde import to_array  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLWR_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module", autouse=True)
def flower_env():
    """Flower offline and quiet, with a temporary FLWR_HOME (ENVIRONMENT.md)."""
    old = {k: os.environ.get(k) for k in [*FLWR_ENV, "FLWR_HOME"]}
    home = tempfile.mkdtemp(prefix="flwr-home-")
    os.environ.update(FLWR_ENV, FLWR_HOME=home)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def task_identity():
    """Messages built outside a running ServerApp need Flower's task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _cfg(tmp_path, name="run", **kw):
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=4, clients_per_round=3, rounds=2,
                local_steps=2, batch_size=4, r_min=2, r_max=16, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4, rank_rule="list", ranks=[2, 4, 8, 16], mode="sequential", lr=1e-2,
                head_lr=1e-2, out_dir=str(tmp_path), run_name=name, checkpoint_every=1, export_clients=1,
                plots=False, target_modules=["query", "value"])
    base.update(kw)
    return FedConfig(**base)


# the same settings as the example app's run config (examples/flower/pyproject.toml overrides)
RUN_CONFIG = ("model='tiny-random-bert' dataset='synthetic' num-clients=4 clients-per-round=3 rounds=2 local-steps=2 "
              "batch-size=4 max-length=16 eval-samples=24 client-eval-samples=4 rank-rule='list' "
              "ranks='2,4,8,16' lr=0.01 min-nodes=4")


class FakeGrid:
    """A grid whose nodes run the ClientApp in this process (no Flower runtime)."""

    def __init__(self, app, n, extra=None):
        self.app, self.ctx = app, {}
        for i in range(n):
            nid = 1000 + 7 * i
            nc = {"partition-id": i, "num-partitions": n, **((extra or {}).get(i, {}))}
            self.ctx[nid] = Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(), run_config={})

    def get_node_ids(self):
        return list(self.ctx)

    def send_and_receive(self, messages, timeout=None):
        return [self.app(m, self.ctx[m.metadata.dst_node_id]) for m in messages]


def _tensors(state):
    return state.A + state.B + [state.head_W, state.head_b]


def _assert_same_state(a, b, **tol):
    for x, y in zip(_tensors(a), _tensors(b), strict=True):
        torch.testing.assert_close(x, y, **tol)


# ---------------------------------------------------------------------------------------------
def test_run_config_maps_to_fedconfig():
    cfg, extra = fedconfig_from_run_config({"num-clients": 4, "clients-per-round": 2, "ranks": "2, 4,8,16",
                                            "rank-rule": "list", "norm-cap": "", "min-nodes": 4})
    assert cfg.num_clients == 4 and cfg.ranks == [2, 4, 8, 16] and cfg.norm_cap is None
    assert extra == {"min-nodes": 4}
    _, extra = fedconfig_from_run_config({"resume": True, "round-timeout-s": 5.0})
    assert extra == {"resume": True, "round-timeout-s": 5.0}
    from hetlora.flower.app import _flag

    assert _flag("true", "resume") is True and _flag(0, "resume") is False and _flag(False, "resume") is False
    with pytest.raises(ValueError, match="resume must be true or false"):
        _flag("maybe", "resume")
    with pytest.raises(ValueError, match="no-such-key"):
        fedconfig_from_run_config({"no-such-key": 1})
    with pytest.raises(ValueError, match="clients_per_round"):
        fedconfig_from_run_config({"num-clients": 2, "clients-per-round": 3})


def test_example_app_is_consistent(monkeypatch):
    """examples/flower: its run config is a valid FedConfig (20 Newsgroups, MiniLM) and its
    components load as a ServerApp and a ClientApp."""
    import importlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: flwr depends on tomli
        import tomli as tomllib
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    app_dir = ROOT / "examples" / "flower"
    tool = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    cfg, extra = fedconfig_from_run_config(tool["config"])
    assert cfg.dataset == "20newsgroups" and cfg.model == "minilm" and cfg.strategy == "hetlora"
    assert set(extra) == {"min-nodes", "node-wait-s", "round-timeout-s", "resume", "overwrite"}
    monkeypatch.syspath_prepend(str(app_dir))
    for key, cls in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        mod, attr = tool["components"][key].split(":")
        assert isinstance(getattr(importlib.import_module(mod), attr), cls)


@pytest.mark.parametrize("shadow", [True, False])
def test_a_ray_py_beside_the_script_is_named(tmp_path, shadow):
    """A ray.py found before the ray package breaks Flower's simulation engine with a confusing
    error; importing hetlora.flower names the file instead."""
    if shadow:
        (tmp_path / "ray.py").write_text("x = 1\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", "import hetlora.flower"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("shadows the ray package" in r.stderr) == shadow, r.stderr[-2000:]
    if shadow:
        assert str(tmp_path / "ray.py") in r.stderr


def test_missing_flwr_gives_an_install_hint():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "try:\n    import hetlora.flower\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install -e .[flower]" in out.stdout and "scripts/setup.sh" in out.stdout


def test_hooks_on_hand_built_messages(tmp_path, task_identity):
    """configure_train sends ranks {2,4,8,16}; an error reply, a NaN reply and a wrong-shape reply
    are dropped (logged with node id and reason, counted) and the round completes without them."""
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=1)
    strat = FlowerStrategy(cfg)
    init = [t.clone() for t in _tensors(strat.state)]
    app = make_client_app()
    grid = FakeGrid(app, 4)
    msgs = list(strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid))
    assert len(msgs) == 4
    by_client = {}
    for m in msgs:
        task = m.content["task"]
        c, r = int(task["client-id"]), int(task["rank"])
        assert strat.node_of[c] == m.metadata.dst_node_id
        assert r == [2, 4, 8, 16][c]
        assert m.content["adapter"]["A.0"].shape == (r, 32) and m.content["adapter"]["B.1"].shape == (r, 32)
        by_client[c] = m

    replies = []
    for c, m in sorted(by_client.items()):
        ctx = grid.ctx[m.metadata.dst_node_id]
        if c == 1:  # a client that crashed
            replies.append(Message(Error(code=2, reason="Traceback ...\nRuntimeError: out of memory"), reply_to=m))
            continue
        rep = app(m, ctx)
        upd = rep.content["update"]
        if c == 2:  # NaN in its adapter
            a = upd["A.0"].numpy().copy()
            a[0, 0] = math.nan
            upd["A.0"] = to_array(torch.from_numpy(a))
        if c == 3:  # wrong shape: B of layer 1 has 7 columns
            upd["B.1"] = to_array(torch.zeros(int(rep.content["metrics"]["rank"]), 7))
        replies.append(rep)
    stray = Message(RecordDict({"update": ArrayRecord()}), reply_to=Message(RecordDict(), 999, "train"))
    arrays, metrics = strat.aggregate_train(1, replies + [stray])
    assert metrics["num-accepted"] == 1 and metrics["num-rejected"] == 3 and metrics["failed"] == 0
    rec = strat.records[-1]
    reasons = {r["client"]: r for r in rec["rejected"]}
    assert "error reply" in reasons[1]["reason"] and "out of memory" in reasons[1]["reason"]
    assert "non-finite" in reasons[2]["reason"] and "shape" in reasons[3]["reason"]
    assert all(reasons[c]["node"] == strat.node_of[c] for c in (1, 2, 3))
    assert rec["eval_acc"] is not None and rec["num_replies"] == 5
    now = _tensors(strat.state)
    assert all(torch.isfinite(t).all() for t in now)
    assert any(not torch.equal(a, b) for a, b in zip(init, now))  # client 0's update went in
    assert arrays["A.0"].shape == (16, 32)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["num_rejected"] == 3


def test_too_few_valid_replies_keep_the_global_state(tmp_path, task_identity):
    """A node that never answers counts as rejected; below min_clients the round fails and the
    global model is unchanged."""
    cfg = _cfg(tmp_path, clients_per_round=2, rounds=1, min_clients=2)
    strat = FlowerStrategy(cfg, write_outputs=False)
    init = [t.clone() for t in _tensors(strat.state)]
    grid = FakeGrid(make_client_app(), 4)
    msgs = list(strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid))
    replies = grid.send_and_receive([msgs[0]])  # the second node never answers
    _, metrics = strat.aggregate_train(1, replies)
    assert metrics["failed"] == 1 and metrics["num-accepted"] == 1 and metrics["num-rejected"] == 1
    assert "no reply" in strat.records[-1]["rejected"][0]["reason"]
    for a, b in zip(init, _tensors(strat.state)):
        assert torch.equal(a, b)


def test_declared_ranks_come_from_node_config(tmp_path, task_identity):
    """A node that declares a rank trains at it (capped at r_max; below r_min too: the device's limit
    wins); one that does not gets the server's rank rule."""
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=1, rank_rule="tiers", ranks=None, tiers=[[1.0, "max"]])
    strat = FlowerStrategy(cfg, write_outputs=False)
    grid = FakeGrid(make_client_app(), 4, extra={0: {"rank": 3}, 1: {"rank": 1}, 3: {"rank": 40}})
    msgs = strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid)
    ranks = {int(m.content["task"]["client-id"]): int(m.content["task"]["rank"]) for m in msgs}
    assert ranks == {0: 3, 1: 1, 2: 16, 3: 16}  # 40 > r_max is capped; 1 < r_min = 2 stays
    _, metrics = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert metrics["num-accepted"] == 4


def test_the_server_weighs_an_update_by_the_scaling_it_sent(tmp_path, task_identity):
    """A node that reports another scaling in its reply changes nothing: the server keeps the
    scaling it sent (HetLoRA's weights are ||s_k B_k^T A_k||: a reported 1e6 would take them all)."""
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=2, checkpoint_every=0)
    states = []
    for lie in (False, True):
        strat = FlowerStrategy(cfg, write_outputs=False)
        grid = FakeGrid(make_client_app(), 4)
        for rnd in (1, 2):  # round 1 leaves B at zero: round 2's weights are the ones that matter
            msgs = list(strat.configure_train(rnd, strat.global_arrays(), ConfigRecord(), grid))
            replies = grid.send_and_receive(msgs)
            if lie:
                replies[0].content["metrics"]["scaling"] = 1e6
            _, metrics = strat.aggregate_train(rnd, replies)
            assert metrics["num-accepted"] == 4
        states.append(strat.state)
    for a, b in zip(_tensors(states[0]), _tensors(states[1]), strict=True):
        assert torch.equal(a, b)


def test_bytes_down_count_what_each_message_carries(tmp_path, task_identity):
    """FLoRA's nodes are sent the merged target weights every round (not the stacked modules the
    simulator counts): bytes_down says so."""
    cfg = _cfg(tmp_path, strategy="flora", clients_per_round=2, rounds=2, checkpoint_every=0)
    strat = FlowerStrategy(cfg, write_outputs=False)
    grid = FakeGrid(make_client_app(), 4)
    for rnd in (1, 2):
        msgs = list(strat.configure_train(rnd, strat.global_arrays(), ConfigRecord(), grid))
        sent = {}
        for m in msgs:
            arrays = m.content["adapter"]
            n = sum(int(np.prod(arrays[k].shape)) for k in arrays if not k.startswith("head"))
            sent[int(m.content["task"]["client-id"])] = n
        strat.aggregate_train(rnd, grid.send_and_receive(msgs))
        rec = strat.records[-1]
        eb = strat.sim.state.head_W.element_size()
        head = strat.sim.state.head_W.numel() + strat.sim.state.head_b.numel()
        assert rec["bytes_down"] == {c: (n + head) * eb for c, n in sent.items()}
        weights = sum(w.numel() for w in strat.sim.state.base_weights)
        assert all(n > weights for n in sent.values())


def test_nodes_that_leave_and_rejoin(tmp_path, task_identity):
    """A sampled client whose node is gone is counted as failed; a node that comes back under a
    new node id gets its partition back."""
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=3)
    strat = FlowerStrategy(cfg, write_outputs=False)
    grid = FakeGrid(make_client_app(), 4)
    msgs = strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid)
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    gone = strat.node_of[0]
    del grid.ctx[gone]
    msgs = strat.configure_train(2, strat.global_arrays(), ConfigRecord(), grid)
    assert len(msgs) == 3
    _, metrics = strat.aggregate_train(2, grid.send_and_receive(msgs))
    assert metrics["num-accepted"] == 3 and metrics["num-rejected"] == 1
    assert "no connected node" in strat.records[-1]["rejected"][0]["reason"]
    grid.ctx[5000] = Context(run_id=1, node_id=5000, node_config={"partition-id": 0}, state=RecordDict(),
                             run_config={})
    msgs = strat.configure_train(3, strat.global_arrays(), ConfigRecord(), grid)
    assert len(msgs) == 4 and strat.node_of[0] == 5000
    _, metrics = strat.aggregate_train(3, grid.send_and_receive(msgs))
    assert metrics["num-accepted"] == 4


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "client-level-dp"])
def test_fake_grid_run_equals_the_simulator(tmp_path, task_identity, dp):
    """Flower's own round loop (Strategy.start) with nodes in this process = hetlora simulate
    --mode sequential, bit for bit (same seed, clients, data), with client-level DP too (the
    server half of a round is the simulator's own `conclude_round`)."""
    kw = {"dp_clip": 0.05, "dp_noise_multiplier": 0.5} if dp else {}
    strat = FlowerStrategy(_cfg(tmp_path, "flower", **kw))
    strat.run(FakeGrid(make_client_app(), 4))
    sim = Simulation(_cfg(tmp_path, "sim", **kw), verbose=False)
    hist = sim.run()
    _assert_same_state(strat.state, sim.state, rtol=0, atol=0)
    assert list(strat.sim.client_ranks) == list(sim.client_ranks)
    assert [r["clients"] for r in strat.records] == [r["clients"] for r in hist.records]
    assert [r.get("dp_epsilon") for r in strat.records] == [r.get("dp_epsilon") for r in hist.records]
    if dp:
        assert all(r["dp_epsilon"] > 0 and r["dp_clipped"] >= 1 for r in strat.records)
    assert (tmp_path / "flower" / "adapters" / "global" / "adapter_config.json").exists()
    for f in ("config.json", "config.yaml", "labels.json"):  # the simulator's run files, so
        assert (tmp_path / "flower" / f).read_bytes() == (tmp_path / "sim" / f).read_bytes().replace(
            b'"sim"', b'"flower"').replace(b"run_name: sim", b"run_name: flower"), f


def test_causal_lm_on_flower_equals_the_simulator(tmp_path, task_identity, caplog):
    """task="causal-lm" (tiny random GPT-2, next-token loss, no federated head) on Flower's round
    loop = the simulator, bit for bit; the records and the server's log carry the next-token metrics."""
    import logging

    kw = dict(model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn", "c_fc"], r_max=8,
              ranks=[2, 4, 8, 3])
    strat = FlowerStrategy(_cfg(tmp_path, "flower", **kw))
    with caplog.at_level(logging.INFO, logger="hetlora.flower"):
        strat.run(FakeGrid(make_client_app(), 4))
    assert any("global test acc" in r.getMessage() and " ppl " in r.getMessage() for r in caplog.records)
    sim = Simulation(_cfg(tmp_path, "sim", **kw), verbose=False)
    hist = sim.run()
    _assert_same_state(strat.state, sim.state, rtol=0, atol=0)
    assert strat.state.head_W.shape[0] == 0  # the LM head is frozen: nothing federated
    assert max(float(t.abs().max()) for t in strat.state.B) > 0  # the adapters moved
    assert [r["eval_ppl"] for r in strat.records] == [r["eval_ppl"] for r in hist.records]
    assert all(math.isfinite(r["eval_ppl"]) and r["eval_ppl"] > 1 for r in strat.records)


@pytest.mark.parametrize("strategy", ["homlora", "zeropad", "flora", "flexlora", "fullft"])
def test_every_strategy_on_flower_equals_the_simulator(tmp_path, task_identity, strategy):
    """Each strategy on Flower's round loop = the simulator, bit for bit; run right after a FLoRA
    run in the same process, whose nodes merged updates into their cached base weights (a node
    must not train the next run on them)."""
    FlowerStrategy(_cfg(tmp_path, "before", strategy="flora")).run(FakeGrid(make_client_app(), 4))
    strat = FlowerStrategy(_cfg(tmp_path, "flower", strategy=strategy))
    strat.run(FakeGrid(make_client_app(), 4))
    sim = Simulation(_cfg(tmp_path, "sim", strategy=strategy), verbose=False)
    sim.run()
    _assert_same_state(strat.state, sim.state, rtol=0, atol=0)
    if sim.state.base_weights is not None:
        for a, b in zip(strat.state.base_weights, sim.state.base_weights, strict=True):
            assert torch.equal(a, b)


class CrashingGrid(FakeGrid):
    """A fake grid whose server process 'dies' when it sends the train messages of a given round."""

    def __init__(self, app, n, crash_at_train_call, extra=None):
        super().__init__(app, n, extra)
        self.train_calls, self.crash_at = 0, crash_at_train_call

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_calls += 1
            if self.train_calls == self.crash_at:
                raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout)


def test_flower_run_resumes_after_a_crash(tmp_path, task_identity):
    """A Flower server killed in round 3 of 4 and started again with resume=True ends exactly as a
    run that was never interrupted: state, ranks (pruning on, declared ranks kept), metrics."""
    kw = dict(rounds=4, checkpoint_every=1, lam=1.0, gamma=0.5, r_min=1)
    whole = FlowerStrategy(_cfg(tmp_path, "whole", **kw))
    whole.run(FakeGrid(make_client_app(), 4, extra={1: {"rank": 3}}))
    assert whole.records[0]["ranks_sent"] != whole.records[-1]["ranks_sent"]  # clients pruned on the way

    cfg = _cfg(tmp_path, "crashed", **kw)
    first = FlowerStrategy(cfg)
    assert json.loads((cfg.run_dir / "status.json").read_text())["status"] == "running"
    with pytest.raises(KeyboardInterrupt):
        first.run(CrashingGrid(make_client_app(), 4, crash_at_train_call=3, extra={1: {"rank": 3}}))
    assert [r["round"] for r in first.records] == [1, 2]
    # flwr run exits 0 after a ServerApp that raised: status.json is what says the run failed
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["rounds_done"] == 2 and status["rounds"] == 4
    assert status["error"] == "KeyboardInterrupt: server killed" and "send_and_receive" in status["traceback"]
    # a line cut short by the crash is ignored on resume
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train_lo')
    metrics = (cfg.run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"other settings: lr=0.01 \(now 0.5\)"):
        FlowerStrategy(_cfg(tmp_path, "crashed", **{**kw, "lr": 0.5}), resume=True)
    assert (cfg.run_dir / "metrics.jsonl").read_bytes() == metrics
    again = FlowerStrategy(cfg, resume=True)
    assert again.round_offset == 2 and again.declared_ranks == {1: 3}
    again.run(FakeGrid(make_client_app(), 4, extra={1: {"rank": 3}}))
    _assert_same_state(again.state, whole.state, rtol=0, atol=0)
    assert list(again.sim.client_ranks) == list(whole.sim.client_ranks)
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert (status["status"], status["rounds_done"], status.get("error")) == ("finished", 4, None)
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4]
    for got, ref in zip(lines, want):
        for k in ("clients", "ranks_sent", "eval_acc", "eval_loss", "train_loss", "cum_bytes_up"):
            assert got[k] == ref[k], (got["round"], k)
    # everything done: a further resume runs no round
    done = FlowerStrategy(cfg, resume=True)
    assert done.round_offset == 4 and done.run(FakeGrid(make_client_app(), 4)) is None


def test_ray_simulation_engine_matches_the_simulator(tmp_path):
    """4 virtual nodes (ranks 2, 4, 8, 16), 2 rounds on Flower's simulation engine: every
    sampled node replies each round and the global adapter equals the simulator's."""
    from flwr.simulation import run_simulation

    # ENVIRONMENT.md: now and then a Ray round receives fewer replies than it sampled, with no
    # error (Flower's, not ours: the round then rejects the missing node, as it must).  One
    # retry on a fresh directory keeps that known flake from failing the suite; two in a row fail.
    for attempt in range(2):
        out = {}
        d = tmp_path / f"try{attempt}"
        run_simulation(server_app=make_server_app(_cfg(d, "flower"), on_finish=lambda s, o=out: o.update(s=s)),
                       client_app=make_client_app(), num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        strat = out["s"]
        if [r["num_replies"] for r in strat.records] == [3, 3]:
            break
    assert [r["num_replies"] for r in strat.records] == [3, 3]
    assert [r["num_accepted"] for r in strat.records] == [3, 3]
    sim = Simulation(_cfg(d, "sim"), verbose=False)
    sim.run()
    _assert_same_state(strat.state, sim.state, rtol=1e-4, atol=1e-5)
    from hetlora.fl.checkpoint import load_checkpoint

    ck = load_checkpoint(d / "flower", restore_rng=False)
    assert ck is not None and ck[0] == 2
    _assert_same_state(ck[1], strat.state, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid):
    out = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out.append(int(k))
        out += _descendants(int(k))
    return out


def _stop(procs):
    """Stop every process we started (and the ones they started) by PID."""
    pids = []
    for p in procs:
        pids += _descendants(p.pid) + [p.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_deployment_superlink_and_supernodes(tmp_path, flower_env):
    """flower-superlink + 4 flower-supernode processes on 127.0.0.1 (ranks 3, 5, rule, 12 declared
    in their node_config), then `flwr run` of examples/flower against them."""
    link, *node_ports = _free_ports(5)
    env = {**os.environ, **FLWR_ENV, "FLWR_HOME": flower_env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        procs.append(subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--port", str(link)], env=env,
                                      stdout=open(logs / "superlink.log", "w"), stderr=subprocess.STDOUT))
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", link), 1).close()
                break
            except OSError:
                assert time.monotonic() - t0 < 60, "the superlink did not start"
                time.sleep(0.3)
        for i, (port, rank) in enumerate(zip(node_ports, [3, 5, None, 12])):
            nc = f"partition-id={i} num-partitions=4" + (f" rank={rank}" if rank else "")
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                 "--node-config", nc], env=env, stdout=open(logs / f"node{i}.log", "w"), stderr=subprocess.STDOUT))
        conf = Path(flower_env) / "config.toml"
        conf.write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link}"\n'
                        "insecure = true\n")
        out = tmp_path / "runs"
        run = subprocess.run([str(BIN / "flwr"), "run", ".", "deploy", "--stream", "--run-config",
                              f"{RUN_CONFIG} out-dir='{out}'"], cwd=ROOT / "examples" / "flower", env=env,
                             capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        recs = [json.loads(x) for x in (out / "flower_hetlora" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in recs] == [1, 2]
        assert json.loads((out / "flower_hetlora" / "status.json").read_text())["status"] == "finished"
        for r in recs:
            assert r["num_replies"] == 3 and r["num_accepted"] == 3, r
            sent = dict(zip(r["clients"], r["ranks_received"]))
            assert all(sent[c] == {0: 3, 1: 5, 2: 8, 3: 12}[c] for c in sent)
    finally:
        _stop(procs)


# ---------------------------------------------------------------------------------------------
# what a deployment audit found (session 9): undeclared run-config keys, reply matching and order,
# invalid declared ranks, an existing run directory
class IdGrid(FakeGrid):
    """A FakeGrid that, like Flower's grids, gives each pushed message an id; replies can come back in
    reverse order, and nodes in ``gone`` answer with the SuperLink's error reply (sender: node 1)."""

    def __init__(self, app, n, reverse=False, gone=(), **kw):
        super().__init__(app, n, **kw)
        self.reverse, self.gone, self._n = reverse, set(gone), 0

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self._n += 1
            m.metadata.__dict__["_message_id"] = f"msg-{self._n}"
            if m.metadata.dst_node_id in self.gone:
                r = Message(Error(code=3, reason="Node Unavailable"), reply_to=m)
                r.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that is gone
            else:
                r = self.app(m, self.ctx[m.metadata.dst_node_id])
            out.append(r)
        return out[::-1] if self.reverse else out


def _rounds(strat, grid, n):
    for rnd in range(1, n + 1):
        msgs = strat.configure_train(rnd, strat.global_arrays(), ConfigRecord(), grid)
        strat.aggregate_train(rnd, grid.send_and_receive(msgs))
    return strat


def test_the_global_adapter_does_not_depend_on_the_order_replies_arrive_in(tmp_path, task_identity):
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=2)
    a = _rounds(FlowerStrategy(cfg, write_outputs=False), IdGrid(make_client_app(), 4), 2)
    b = _rounds(FlowerStrategy(cfg, write_outputs=False), IdGrid(make_client_app(), 4, reverse=True), 2)
    for x, y in zip(_tensors(a.state), _tensors(b.state), strict=True):
        assert torch.equal(x, y)
    assert a.records[-1]["clients"] == b.records[-1]["clients"]


def test_an_error_reply_from_the_superlink_is_the_gone_nodes_failure(tmp_path, task_identity, caplog):
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=1)
    grid = IdGrid(make_client_app(), 4)
    strat = FlowerStrategy(cfg, write_outputs=False)
    msgs = strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid)
    gone = msgs[1].metadata.dst_node_id
    grid.gone = {gone}
    with caplog.at_level("WARNING", logger="hetlora.flower"):
        strat.aggregate_train(1, grid.send_and_receive(msgs))
    rec = strat.records[-1]
    assert rec["num_accepted"] == 3 and rec["num_rejected"] == 1
    rej = rec["rejected"][0]
    assert rej["node"] == gone and "Node Unavailable" in rej["reason"]
    assert "unexpected reply" not in caplog.text


@pytest.mark.parametrize("raw", [0, -3, "abc", 4.5, True])
def test_a_node_declaring_an_unusable_rank_trains_at_the_rules_rank(tmp_path, task_identity, caplog, raw):
    cfg = _cfg(tmp_path, clients_per_round=4, rounds=1, rank_rule="tiers", ranks=None, tiers=[[1.0, "max"]])
    strat = FlowerStrategy(cfg, write_outputs=False)
    grid = IdGrid(make_client_app(), 4, extra={0: {"rank": raw}})
    with caplog.at_level("WARNING", logger="hetlora.flower"):
        msgs = strat.configure_train(1, strat.global_arrays(), ConfigRecord(), grid)
        strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert strat.records[-1]["num_accepted"] == 4  # the node trains (it used to refuse every task)
    assert 0 not in strat.declared_ranks and "rank" in caplog.text and "rule" in caplog.text


def test_every_fedconfig_field_is_declared_in_the_example_app_and_its_defaults_parse():
    import dataclasses

    import tomllib

    app_cfg = tomllib.loads((ROOT / "examples" / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "config"]
    missing = [f.name for f in dataclasses.fields(FedConfig) if f.name.replace("_", "-") not in app_cfg]
    assert not missing, f"flwr run --run-config refuses undeclared keys: declare {missing}"
    cfg, extra = fedconfig_from_run_config(app_cfg)
    assert cfg.target_modules == ["query", "value"] and cfg.tiers == FedConfig().tiers and cfg.dp_clip is None
    assert cfg.mode == "sequential" and set(extra) == {"min-nodes", "node-wait-s", "round-timeout-s", "resume",
                                                       "overwrite"}
    dp, _ = fedconfig_from_run_config({**app_cfg, "dp-clip": 1.0, "tiers": "0.5:min,0.5:max",
                                       "target-modules": "query"})
    assert dp.dp_clip == 1.0 and dp.tiers == [[0.5, "min"], [0.5, "max"]] and dp.target_modules == ["query"]


@pytest.mark.parametrize("changes, match", [({"ranks": "a,b,c,d", "rank-rule": "list"}, "ranks must be"),
                                            ({"tiers": "[0.5"}, "tiers is not valid JSON")])
def test_bad_run_config_values_name_their_key(changes, match):
    with pytest.raises(ValueError, match=match):
        fedconfig_from_run_config({"num-clients": 4, "clients-per-round": 2, **changes})


def test_min_nodes_that_is_no_number_is_named():
    from hetlora.flower.app import _number

    with pytest.raises(ValueError, match="min-nodes must be a number"):
        _number({"min-nodes": "x"}, "min-nodes", 0, int)
    with pytest.raises(ValueError, match="min-nodes must be a whole number"):
        _number({"min-nodes": 2.5}, "min-nodes", 0, int)
    assert _number({}, "node-wait-s", 120.0, float) == 120.0
    for key, v in (("round-timeout-s", -1.0), ("node-wait-s", float("nan")), ("min-nodes", -2)):
        with pytest.raises(ValueError, match=f"{key} must be a finite number >= 0"):
            _number({key: v}, key, 0, int if key == "min-nodes" else float)


def test_a_flower_run_does_not_replace_an_earlier_run_unless_told(tmp_path, task_identity):
    cfg = _cfg(tmp_path, clients_per_round=2, rounds=1)
    _rounds(FlowerStrategy(cfg), IdGrid(make_client_app(), 4), 1)
    with pytest.raises(ValueError, match="already holds a run"):
        FlowerStrategy(cfg)
    (cfg.run_dir / "stale.txt").write_text("x")
    FlowerStrategy(cfg, overwrite=True)
    assert not (cfg.run_dir / "stale.txt").exists()
    FlowerStrategy(cfg, resume=True)  # resuming is what a second start should do
