"""On a GPU: every strategy runs `hetlora simulate` end to end with its adapters on the device,
and each round's server aggregation there agrees with the same aggregation of the same
updates moved to the CPU.

The first lend with the simulator benchmark found HetLoRA's aggregation mixing a host tensor
(the data-size fallback weights) with the device's norms: every GPU simulation stopped at the
end of round 1.  The CPU suite cannot see a device mix, hence this file (a CPU check of the
same function with a stand-in device is in ``tests/test_strategies_device.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")

DEVICE = "cuda"


def _to_cpu(obj):
    """A copy of a GlobalState / ClientUpdate with every tensor (also in lists) on the CPU."""
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.cpu()
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name)) for f in dataclasses.fields(obj)})


@pytest.mark.parametrize("strategy,extra", [
    ("hetlora", {}),
    ("hetlora", {"aggregation": "client", "norm_cap": 2.0}),
    ("homlora", {}),
    ("zeropad", {}),
    ("flora", {}),
    ("flexlora", {}),
    ("fullft", {}),
])
def test_every_strategy_simulates_on_the_gpu(tmp_path, strategy, extra):
    from hetlora.fl import FedConfig, Simulation

    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                    local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                    client_eval_samples=0, out_dir=str(tmp_path), run_name="run", export_clients=0, plots=False,
                    tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], device=DEVICE,
                    strategy=strategy, **extra)
    sim = Simulation(cfg, verbose=False)
    strat = sim.strategy
    real = strat.aggregate
    checked = []

    def both(state, updates):
        out = real(state, updates)
        ref = real(_to_cpu(state), [_to_cpu(u) for u in updates])
        got, want = out.tensors(), ref.tensors()
        assert got.keys() == want.keys()
        for k, t in got.items():
            assert t.device.type == torch.device(DEVICE).type, k
            assert torch.isfinite(t).all(), k
            torch.testing.assert_close(t.cpu(), want[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        checked.append(len(updates))
        return out

    strat.aggregate = both
    records = sim.run().records
    assert checked == [3, 3]
    assert [r["round"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)


@pytest.mark.parametrize("model,extra", [
    ("tiny-random-bert", {"target_modules": ["query", "value"]}),
    ("tiny-random-bert", {"target_modules": ["query", "value"], "norm_cap": 2.0}),  # a per-layer median
    ("tiny-random-gpt2", {"task": "causal-lm", "target_modules": ["c_attn"]}),
])
def test_deterministic_runs_repeat_bit_for_bit_on_the_gpu(tmp_path, model, extra):
    """``FedConfig.deterministic``: two identical GPU runs end with the same bits (the clipping
    norms, the per-client losses and the heads' gradients otherwise add in a varying order), no
    op in a round refuses the mode, and the Triton kernels run pinned configs (an autotuner's pick
    may differ in another process; `tests/test_triton_fast_launch.py` checks the pin)."""
    from hetlora.fl import FedConfig, Simulation

    def run(name):
        cfg = FedConfig(model=model, dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                        local_steps=3, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24,
                        progress=False, client_eval_samples=0, out_dir=str(tmp_path), run_name=name,
                        export_clients=0, plots=False, tiers=[[0.5, "min"], [0.5, "max"]], device=DEVICE,
                        deterministic=True, **extra)
        sim = Simulation(cfg, verbose=False)
        sim.run()
        return {k: v.detach().cpu().clone() for k, v in sim.state.tensors().items()}

    a, b = run("a"), run("b")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


_RUN_IN_A_NEW_PROCESS = """
import sys, torch
from hetlora.fl import FedConfig, Simulation
cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=3, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=0, out_dir=sys.argv[1], run_name=sys.argv[2], export_clients=0, plots=False,
                tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], device="cuda",
                deterministic=True)
sim = Simulation(cfg, verbose=False)
sim.run()
torch.save({k: v.detach().cpu() for k, v in sim.state.tensors().items()}, sys.argv[3])
"""


def test_deterministic_runs_repeat_bit_for_bit_across_processes_with_autotuning_on(tmp_path):
    """Two processes, each with Triton's autotuner on (each would time the configs anew and may
    pick differently): the pinned configs make the two runs agree bit for bit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HETLORA_TRITON_AUTOTUNE": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)  # FedConfig.deterministic sets it before CUDA starts
    out = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.pt"
        r = subprocess.run([sys.executable, "-c", _RUN_IN_A_NEW_PROCESS, str(tmp_path), name, str(path)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(torch.load(path))
    a, b = out
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ
