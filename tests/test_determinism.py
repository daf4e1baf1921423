"""``FedConfig.deterministic``: torch's deterministic algorithms around a round's local training
and its aggregation, restored after; on the CPU (deterministic anyway) the same bits as without.
The GPU half (two runs bit for bit) is ``test_deterministic_runs_repeat_bit_for_bit_on_the_gpu``
in ``tests/test_cuda_strategies.py``."""

from __future__ import annotations

import os

import pytest
import torch

from hetlora.fl import FedConfig, Simulation
from hetlora.fl import local as local_mod
from hetlora.fl import sim as sim_mod
from hetlora.fl.determinism import CUBLAS_WORKSPACE, deterministic_algorithms
from hetlora_kernels.dispatch import kernel_configs_pinned


@pytest.fixture
def restore_torch_mode():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    if env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def test_the_mode_holds_inside_the_block_and_the_previous_one_after(restore_torch_mode, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # off: nothing touched
    assert not kernel_configs_pinned()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert kernel_configs_pinned()  # the Triton kernels' first configs (no autotuner's pick)
    assert not torch.are_deterministic_algorithms_enabled() and not kernel_configs_pinned()
    with pytest.raises(KeyError), deterministic_algorithms(True):
        raise KeyError("a failing round")
    assert not torch.are_deterministic_algorithms_enabled() and not kernel_configs_pinned()
    # a caller's own warn-only mode comes back as it was, and a user's cuBLAS setting stays
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_algorithms(True):
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def _run(tmp_path, name, **kw):
    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                    local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                    client_eval_samples=0, out_dir=str(tmp_path), run_name=name, export_clients=0, plots=False,
                    tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], **kw)
    sim = Simulation(cfg, verbose=False)
    sim.run()
    return {k: v.detach().clone() for k, v in sim.state.tensors().items()}


def test_a_deterministic_run_trains_and_aggregates_in_the_mode_and_changes_no_bit_on_the_cpu(
        tmp_path, monkeypatch, restore_torch_mode):
    torch.use_deterministic_algorithms(False)
    seen = {"local": [], "server": []}
    train, conclude = local_mod._train_round, sim_mod.Simulation._conclude_round

    def spy_train(*a, **k):
        seen["local"].append(torch.are_deterministic_algorithms_enabled())
        return train(*a, **k)

    def spy_conclude(self, *a, **k):
        seen["server"].append(torch.are_deterministic_algorithms_enabled())
        return conclude(self, *a, **k)

    monkeypatch.setattr(local_mod, "_train_round", spy_train)
    monkeypatch.setattr(sim_mod.Simulation, "_conclude_round", spy_conclude)
    on = _run(tmp_path, "on", deterministic=True)
    assert seen == {"local": [True, True], "server": [True, True]}
    assert not torch.are_deterministic_algorithms_enabled()  # given back after each round
    seen = {"local": [], "server": []}
    off = _run(tmp_path, "off")
    assert seen == {"local": [False, False], "server": [False, False]}
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def test_deterministic_must_be_a_bool():
    with pytest.raises(ValueError, match="deterministic"):
        FedConfig(deterministic="yes").validate()
