"""Crash safety (DESIGN.md section 7, issue 11 item 3).

* A run killed with SIGKILL in a subprocess mid-way resumes (``hetlora simulate --resume``)
  to exactly the result of an uninterrupted run with the same seed: every tensor of the
  final checkpoint and of the exported global adapter bitwise, client ranks, and the
  metrics.jsonl rows (all fields but the timings).
* A corrupted or truncated checkpoint gives a clear error naming the file, and the
  previous checkpoint is still on disk and usable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetlora.cli import main as cli_main
from hetlora.fl import FedConfig, Simulation
from hetlora.fl.checkpoint import load_checkpoint

TIMING_FIELDS = {"wall_time", "elapsed"}  # the only metrics allowed to differ between two runs


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out_dir, **kw) -> FedConfig:
    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=3,
                local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4, lr=1e-2, head_lr=1e-2, out_dir=str(out_dir), run_name="run",
                checkpoint_every=1, export_clients=1, plots=False, tiers=[[0.5, "min"], [0.5, "max"]],
                target_modules=["query", "value"], threads=1, lam=0.5, gamma=0.6)
    base.update(kw)
    return FedConfig(**base)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensor names"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k} differs in dtype/shape"
        assert torch.equal(a[k], b[k]), f"{what}: tensor {k} differs (max |diff| " \
                                        f"{(a[k].double() - b[k].double()).abs().max().item():.3g})"


def _ckpt_tensors(run_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    # cloned: load_file may hand back tensors backed by an mmap of the file, which a test
    # that later truncates the file in place would change under our feet
    t = {k: v.clone() for k, v in load_file(str(run_dir / "checkpoints" / f"round_{rnd:04d}.safetensors")).items()}
    # the process-global torch generator state is saved for resuming, but it is not a result
    # of the run (the reference run's process was seeded differently by conftest)
    t.pop("torch_rng")
    return t


# --------------------------------------------------------------------------------------------------
# SIGKILL mid-way, then --resume
# --------------------------------------------------------------------------------------------------
# The child runs the real command line.  Its only change: when round KILL_ROUND is about to
# start, it writes a marker and sleeps, so the parent kills it at a known point: in the middle
# of round 4, after the metrics row of round 3 and the last due checkpoint are on disk.
_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hetlora.fl import sim as S

    cfg_path, marker, kill_round = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    _round = S.Simulation.run_round

    def run_round(self, rnd, progress=None):
        if rnd == kill_round:
            marker.write_text(str(rnd))
            time.sleep(600)  # the parent's SIGKILL lands here
        return _round(self, rnd, progress)

    S.Simulation.run_round = run_round
    from hetlora.cli import main
    sys.exit(main(["simulate", "--config", cfg_path, "--quiet"]))
""")


@pytest.mark.parametrize("every,last_ckpt", [(1, 3), (2, 2)])
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path, capsys, every, last_ckpt):
    # rounds=5, killed in round 4.  Checkpoint every round: checkpoint 3 is on disk.  Every 2
    # rounds: checkpoint 2 and metrics rows 1..3, so the resume must also drop the stale row 3
    # and redo rounds 3..5.
    kw = dict(rounds=5, checkpoint_every=every)
    ref_dir, run_dir = tmp_path / "ref" / "run", tmp_path / "crash" / "run"
    cfg = _cfg(tmp_path / "crash", **kw)
    cfg_file = tmp_path / "crash.json"
    cfg.to_json(cfg_file)
    marker = tmp_path / "in_round"

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log = open(tmp_path / "child.log", "wb")  # a file, not a pipe: a chatty child can never block on it
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_file), str(marker), "4"], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the child ended (rc {proc.returncode}) before round 4:\n"
                            f"{(tmp_path / 'child.log').read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the child did not reach round 4 within 180 s")
            time.sleep(0.05)
        # state on disk at the moment of the kill
        latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
        assert latest["round"] == last_ckpt and latest["file"] == f"round_{last_ckpt:04d}.safetensors"
        assert [r["round"] for r in _rows(run_dir)] == [1, 2, 3]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "adapters").exists()  # it really did not finish
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a temporary file was left behind"

    # resume through the command line, in this process
    assert cli_main(["simulate", "--config", str(run_dir / "config.json"), "--resume", "--quiet"]) == 0
    capsys.readouterr()

    # the uninterrupted reference with the same seed
    Simulation(_cfg(tmp_path / "ref", **kw), verbose=False).run()

    ref_rows, got_rows = _rows(ref_dir), _rows(run_dir)
    assert [r["round"] for r in got_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(ref_rows, got_rows):
        assert a == b, f"metrics row of round {a['round']} differs"
    assert got_rows[-1]["client_ranks"] == ref_rows[-1]["client_ranks"]

    ref_ck, got_ck = _ckpt_tensors(ref_dir, 5), _ckpt_tensors(run_dir, 5)
    _assert_same_tensors(ref_ck, got_ck, "final checkpoint")
    assert {k for k in got_ck if k.startswith(("A.", "B."))} and "client_ranks" in got_ck
    for name in ("adapter_model.safetensors", "head.safetensors"):
        _assert_same_tensors(load_file(str(ref_dir / "adapters" / "global" / name)),
                             load_file(str(run_dir / "adapters" / "global" / name)), f"global adapter {name}")
    ref_clients = sorted(p.name for p in (ref_dir / "adapters").glob("client_*"))
    assert ref_clients == sorted(p.name for p in (run_dir / "adapters").glob("client_*")) and ref_clients
    for c in ref_clients:
        _assert_same_tensors(load_file(str(ref_dir / "adapters" / c / "adapter_model.safetensors")),
                             load_file(str(run_dir / "adapters" / c / "adapter_model.safetensors")), c)
    # keep=2: the last two checkpoints, written by the resumed run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest.json", "round_0004.safetensors", "round_0005.safetensors"]


# --------------------------------------------------------------------------------------------------
# corrupted / truncated checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path):
    """A finished 3-round run (checkpoints after rounds 2 and 3 kept) and its global tensors
    after round 2 (snapshotted while round 3 runs) and after round 3."""
    sim = Simulation(_cfg(tmp_path, export_clients=0), verbose=False)
    after2: dict[str, torch.Tensor] = {}

    def snap(rnd, ups):
        if rnd == 3:
            after2.update({k: v.detach().clone() for k, v in sim.state.tensors().items()})
            after2["client_ranks"] = torch.as_tensor(sim.client_ranks.copy())
        return ups

    sim.update_hook = snap
    sim.run()
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "round_0002.safetensors",
                                                    "round_0003.safetensors"]
    return run_dir, after2, _ckpt_tensors(run_dir, 3), json.loads((ck / "latest.json").read_text())


def _previous_checkpoint_is_usable(run_dir: Path, after2: dict, after3: dict, latest_meta: dict) -> None:
    """round_0002 is intact, holds the state after round 2, and a run resumed from it (by
    pointing latest.json at it: the manual recovery) reproduces round 3 exactly."""
    ck = run_dir / "checkpoints"
    prev = ck / "round_0002.safetensors"
    assert prev.exists(), "the previous checkpoint was deleted"
    _assert_same_tensors(after2, _ckpt_tensors(run_dir, 2), "round 2 checkpoint")
    (ck / "round_0003.safetensors").unlink(missing_ok=True)
    (ck / "latest.json").write_text(json.dumps({**latest_meta, "round": 2, "file": prev.name}))
    sim = Simulation(FedConfig.from_json(run_dir / "config.json"), verbose=False)
    hist = sim.run(resume=True)
    assert [r["round"] for r in hist.records] == [1, 2, 3]
    _assert_same_tensors(after3, _ckpt_tensors(run_dir, 3), "round 3 redone from the round 2 checkpoint")


def _failed_resume(run_dir: Path, name: str, capsys) -> None:
    """The command line's --resume: exit status 2, an error naming ``name``, no traceback,
    metrics.jsonl untouched."""
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert cli_main(["simulate", "--config", str(run_dir / "config.json"), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err, err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_truncated_checkpoint_names_the_file_and_keeps_the_previous(finished_run, capsys):
    run_dir, after2, after3, latest_meta = finished_run
    bad = run_dir / "checkpoints" / "round_0003.safetensors"
    data = bad.read_bytes()
    for cut in (len(data) // 2, 5):  # a cut in the data, and one in the 8-byte header length
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="round_0003.safetensors"):
            load_checkpoint(run_dir, restore_rng=False)
        _failed_resume(run_dir, "round_0003.safetensors", capsys)
        assert bad.read_bytes() == data[:cut], "the failed resume touched the corrupt file"
    _previous_checkpoint_is_usable(run_dir, after2, after3, latest_meta)


def test_garbage_latest_json_names_the_file_and_keeps_the_checkpoints(finished_run, capsys):
    run_dir, after2, after3, latest_meta = finished_run
    latest = run_dir / "checkpoints" / "latest.json"
    for garbage in (b"{\"round\": 3, \"fi", b"\x00\xffnot json", b"[1, 2]", b"{\"round\": 3}"):
        latest.write_bytes(garbage)
        with pytest.raises(ValueError, match="latest.json"):
            load_checkpoint(run_dir, restore_rng=False)
        _failed_resume(run_dir, "latest.json", capsys)
        assert latest.read_bytes() == garbage
        assert (run_dir / "checkpoints" / "round_0003.safetensors").exists()
    _assert_same_tensors(after3, _ckpt_tensors(run_dir, 3), "round 3 checkpoint after the failed resumes")
    _previous_checkpoint_is_usable(run_dir, after2, after3, latest_meta)


def test_missing_index_with_round_files_is_refused(tmp_path):
    """Round files without latest.json must not be silently discarded by a fresh start."""
    from hetlora.fl.checkpoint import CKPT_DIR, load_checkpoint

    assert load_checkpoint(tmp_path) is None  # no checkpoint at all: a fresh run
    ck = tmp_path / CKPT_DIR
    ck.mkdir()
    (ck / "round_0002.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="latest.json.*round_0002"):
        load_checkpoint(tmp_path)


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_with_other_settings_is_refused_and_touches_nothing(finished_run, capsys):
    """--resume of a run directory with settings that change what is trained (here the client
    count and the learning rate) exits 2 naming every differing field; the run is untouched.
    Settings that only extend or move the run (more rounds, another backend) resume it."""
    run_dir = finished_run[0]
    before = _tree_bytes(run_dir)
    cfg = ["simulate", "--config", str(run_dir / "config.json"), "--resume", "--quiet"]
    assert cli_main([*cfg, "--num-clients", "8", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "num_clients=6 (now 8)" in err and "lr=" in err, err
    assert "Traceback" not in err
    assert _tree_bytes(run_dir) == before
    sim = Simulation(FedConfig.from_json(run_dir / "config.json").replace(seed=1), verbose=False)
    with pytest.raises(ValueError, match=r"seed=0 \(now 1\)"):
        sim.run(resume=True)
    assert _tree_bytes(run_dir) == before
    # more rounds, another backend: the run goes on from round 3
    assert cli_main([*cfg, "--rounds", "4", "--backend", "torch"]) == 0
    rounds = [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_resumed_history_equals_the_uninterrupted_one(tmp_path):
    """The History a resumed run returns holds the restored rounds as a live run records them
    (per-client dicts keyed by int client ids, not JSON's strings), equal to an uninterrupted
    run's but for the timings."""
    whole = Simulation(_cfg(tmp_path / "a"), verbose=False).run()
    Simulation(_cfg(tmp_path / "b", rounds=2), verbose=False).run()
    resumed = Simulation(_cfg(tmp_path / "b"), verbose=False).run(resume=True)

    def strip(r):
        return {k: v for k, v in r.items() if k not in TIMING_FIELDS}

    assert [strip(r) for r in resumed.records] == [strip(r) for r in whole.records]
    assert all(isinstance(c, int) for r in resumed.records for c in r["bytes_up"])


def test_a_cuda_graphs_run_rebuilds_on_a_cpu(tmp_path):
    """A run made with cuda_graphs on a GPU exports and evaluates on a machine without one (the
    setting is dropped there, where FedConfig refuses it)."""
    Simulation(_cfg(tmp_path, export_clients=0, rounds=1), verbose=False).run()
    run_dir = tmp_path / "run"
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg.update(device="cuda", cuda_graphs=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    sim = Simulation.from_run_dir(run_dir, device="cpu")
    assert sim.config.device == "cpu" and sim.config.cuda_graphs is False
    assert cli_main(["export", str(run_dir), str(tmp_path / "out"), "--global"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_lora_dropout_masks_survive_a_resume_and_an_extension(tmp_path):
    """LoRA dropout's masks come from (seed, round) alone (`hetlora.fl.local.round_rng`): one
    round, then a resume extended to three, lands bit for bit where three rounds in one go land
    (the global generator's history before a round no longer matters)."""
    kw = dict(lora_dropout=0.3, export_clients=0, rounds=3)
    whole = Simulation(_cfg(tmp_path / "a", **kw), verbose=False)
    whole.run()
    Simulation(_cfg(tmp_path / "b", **{**kw, "rounds": 1}), verbose=False).run()
    resumed = Simulation(_cfg(tmp_path / "b", **kw), verbose=False)
    resumed.run(resume=True)
    a, b = whole.state.tensors(), resumed.state.tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = torch.get_rng_state()
    from hetlora.fl.local import round_rng

    with round_rng(0, 5, torch.device("cpu")):
        x = torch.rand(4)
    with round_rng(0, 5, torch.device("cpu")):
        assert torch.equal(torch.rand(4), x)  # the same round draws the same
    with round_rng(0, 6, torch.device("cpu")):
        assert not torch.equal(torch.rand(4), x)
    assert torch.equal(torch.get_rng_state(), before)  # and the global stream is left as it was


def test_with_lora_dropout_a_resume_may_not_change_mode_or_device(tmp_path):
    """Dropout masks depend on the mode (where a client's rows sit in the batch) and on the device's
    generator: such a resume would not land where the uninterrupted run lands, so it is refused,
    naming the field; without dropout the mode may change."""
    Simulation(_cfg(tmp_path / "a", lora_dropout=0.3, export_clients=0, rounds=1), verbose=False).run()
    sim = Simulation(_cfg(tmp_path / "a", lora_dropout=0.3, export_clients=0, rounds=2, mode="sequential"),
                     verbose=False)
    with pytest.raises(ValueError, match=r"mode='concurrent' \(now 'sequential'\)"):
        sim.run(resume=True)
    Simulation(_cfg(tmp_path / "b", export_clients=0, rounds=1), verbose=False).run()
    Simulation(_cfg(tmp_path / "b", export_clients=0, rounds=2, mode="sequential"), verbose=False).run(resume=True)
    assert [r["round"] for r in _rows(tmp_path / "b" / "run")] == [1, 2]


def test_an_export_cut_short_is_written_again_by_the_resume(tmp_path):
    """The adapters of a finished run appear whole or not at all: a run killed while exporting
    leaves none, and its resume (every round done) exports them."""
    cfg = _cfg(tmp_path, export_clients=1, rounds=1)
    sim = Simulation(cfg, verbose=False)
    real = Simulation.export_client

    def killed(self, *a, **k):  # the global adapter is written, then the process dies
        raise KeyboardInterrupt

    Simulation.export_client = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            sim.run()
    finally:
        Simulation.export_client = real
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapters").exists()
    Simulation(cfg, verbose=False).run(resume=True)
    names = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert names[0] == "client_" + names[0].split("_")[1] and names[1] == "global" and len(names) == 2
    assert (run_dir / "adapters" / "global" / "adapter_model.safetensors").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".adapters")]
