"""On a GPU: the simulator paths `tests/test_cuda_strategies.py` leaves out, each end to end on
the device: local evaluation and the end-of-run export (which `Simulation.run` only logs when it
fails: checked here by its files), causal LM and bf16, sequential mode with LoRA dropout, a
resume (dropout masks from (seed, round) on the device too), `hetlora export` (peft and
merged) and `hetlora evaluate`, the merged classifier, and client-level DP where opacus is
installed.  Written from a device-handling audit of every path on a CPU stand-in for a GPU
(session 10); a default GPU run had crashed after round 1 before it.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")

GPT2 = dict(model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn", "c_fc"])


def _cfg(tmp_path, name, **kw):
    from hetlora.fl import FedConfig

    base = dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24, progress=False,
                client_eval_samples=4, out_dir=str(tmp_path), run_name=name, export_clients=1, checkpoint_every=1,
                plots=False, tiers=[[0.5, "min"], [0.5, "max"]], target_modules=["query", "value"], device="cuda")
    base.update(kw)
    return FedConfig(**base)


def _run(cfg, **run_kw):
    from hetlora.fl import Simulation

    sim = Simulation(cfg, verbose=False)
    hist = sim.run(**run_kw)
    assert (sim.run_dir / "adapters" / "global" / "adapter_model.safetensors").exists(), "the export failed"
    assert all(t.device.type == "cuda" for t in sim.state.tensors().values())
    assert hist.final_accuracy is not None
    return sim, hist


@pytest.mark.parametrize("kw", [dict(strategy="hetlora", **GPT2), dict(strategy="flexlora", dtype="bfloat16"),
                                dict(strategy="flora", dtype="bfloat16", **GPT2),
                                dict(strategy="hetlora", mode="sequential", lora_dropout=0.2)],
                         ids=["causal", "flexlora-bf16", "flora-causal-bf16", "sequential-dropout"])
def test_a_run_evaluates_and_exports_on_the_gpu(tmp_path, kw):
    _, hist = _run(_cfg(tmp_path, "run", **kw))
    if kw.get("task") != "causal-lm":  # the clients' held-out scores (local evaluation ran)
        assert all(r.get("client_acc") is not None for r in hist.records), hist.records[-1]
    assert all(r["num_rejected"] == 0 for r in hist.records), hist.records[-1]


def test_resume_continues_the_dropout_masks(tmp_path):
    """Two rounds in one go against one round, a resume, and the second: LoRA dropout draws from
    the CUDA generator, seeded from (seed, round) for each round (`hetlora.fl.local.round_rng`).
    Equal to index_add's rounding (atomics), far inside what other masks would change."""
    from hetlora.fl import Simulation

    kw = dict(lora_dropout=0.3, local_steps=3)
    whole, _ = _run(_cfg(tmp_path, "whole", **kw))
    Simulation(_cfg(tmp_path, "split", rounds=1, **kw), verbose=False).run()
    split, _ = _run(_cfg(tmp_path, "split", **kw), resume=True)
    a, b = whole.state.tensors(), split.state.tensors()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda s, k=k: f"{k}: {s}")


def test_export_and_evaluate_commands_on_a_gpu_run(tmp_path):
    from hetlora.cli import main as cli
    from hetlora.fl.merged import MergedClassifier

    sim, _ = _run(_cfg(tmp_path, "run"))

    def ok(*args: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli(list(args))
        assert rc == 0, err.getvalue()[-2000:]
        return out.getvalue()

    d = str(sim.run_dir)
    ok("export", d, str(tmp_path / "g"), "--global")
    ok("export", d, str(tmp_path / "c"), "--client", "1")
    ok("export", d, str(tmp_path / "m"), "--global", "--merged")
    assert "%" in ok("evaluate", d, "--by-rank")
    assert "%" in ok("evaluate", d, "--client", "2", "--device", "cuda")
    clf = MergedClassifier.from_dir(str(tmp_path / "m"), device="cuda")
    logits = clf.logits_from_ids(torch.randint(0, 60, (3, 10)), torch.ones(3, 10, dtype=torch.int64))
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()


@pytest.mark.parametrize("kw", [dict(dp_clip=1.0, dp_noise_multiplier=1.0),
                                dict(strategy="homlora", dtype="bfloat16", dp_clip=0.05, dp_noise_multiplier=0.5)],
                         ids=["hetlora", "homlora-bf16"])
def test_client_level_dp_on_the_gpu(tmp_path, kw):
    pytest.importorskip("opacus", reason="client-level DP accounting needs opacus")
    _run(_cfg(tmp_path, "dp", **kw))
