"""`hetlora evaluate`: a finished run scored again from its checkpoint, as the run scored itself."""

import json

import pytest

from hetlora.cli import main
from hetlora.fl import Simulation

from .helpers import tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, **kw):
    return Simulation(tiny_run_config(tmp_path, **{"client_eval_samples": 0, **kw}), verbose=False).run()


def _scores(capsys) -> dict:
    """``{model: {field: value}}`` of the printed lines (``model: field value  field value ...``)."""
    out = {}
    for line in capsys.readouterr().out.strip().splitlines():
        who, _, rest = line.partition(": ")
        words = rest.split()
        out[who] = dict(zip(words[::2], words[1::2]))
    return out


def test_evaluate_reproduces_the_runs_own_score_and_scores_more(tmp_path, capsys):
    hist = _run(tmp_path)
    last = hist.records[-1]
    run = str(tmp_path / "run")
    assert main(["evaluate", run, "--eval-samples", "24", "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["test_documents"] == 24 and got["model"] == "global"
    assert got["accuracy"] == last["eval_acc"]
    assert got["loss"] == pytest.approx(last["eval_loss"], rel=1e-9)
    assert _scores(capsys)["global"]["accuracy"] == f"{100 * last['eval_acc']:.2f}%"
    assert main(["evaluate", run]) == 0  # the whole test set by default
    assert _scores(capsys)["global"]["test_documents"] == "100"


def test_evaluate_a_client_model(tmp_path, capsys):
    _run(tmp_path, scaling_rule="alpha/r", lora_alpha=4.0)  # a client's scaling differs from the global one
    sim = Simulation.from_run_dir(tmp_path / "run")
    low = int(sim.client_ranks.argmin())
    assert main(["evaluate", str(tmp_path / "run"), "--client", str(low), "--json", str(tmp_path / "c.json")]) == 0
    got = json.loads((tmp_path / "c.json").read_text())
    import dataclasses

    from hetlora.fl.local import evaluate

    sim.config.eval_samples = 0
    sim.setup()
    A, B, r, s = sim.adapter_of(low)
    assert r < sim.state.rank  # a truncated adapter: not the global model again
    acc, loss = evaluate(sim.fm, dataclasses.replace(sim.state, A=A, B=B, scaling=s), sim.data.test)
    assert got["model"] == f"client {low}" and got["accuracy"] == acc and got["loss"] == pytest.approx(loss)


def test_causal_lm_runs_report_perplexity(tmp_path, capsys):
    hist = _run(tmp_path, model="tiny-random-gpt2", task="causal-lm", target_modules=["c_attn"])
    assert main(["evaluate", str(tmp_path / "run"), "--eval-samples", "24"]) == 0
    s = _scores(capsys)["global"]
    assert float(s["perplexity"]) == pytest.approx(hist.records[-1]["eval_ppl"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["hetlora", "homlora"])
def test_evaluate_by_rank_scores_the_model_each_rank_gets(tmp_path, capsys, strategy):
    _run(tmp_path, strategy=strategy, hom_rank=2)
    run = str(tmp_path / "run")
    assert main(["evaluate", run, "--by-rank", "--eval-samples", "24", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    printed = _scores(capsys)
    sim = Simulation.from_run_dir(tmp_path / "run")
    ranks = sorted(set(int(r) for r in sim.client_ranks))
    assert [r["model"] for r in rows] == ["global"] + [f"rank {r}" for r in ranks]
    assert set(printed) == {r["model"] for r in rows}
    for row in rows[1:]:
        assert row["clients"] == [c for c, r in enumerate(sim.client_ranks) if f"rank {r}" == row["model"]]
        assert row["rank"] == sim.adapter_of(row["clients"][0])[2]  # the rank it is sent, not its device's
        assert main(["evaluate", run, "--client", str(row["clients"][-1]), "--eval-samples", "24",
                     "--json", str(tmp_path / "one.json")]) == 0
        one = json.loads((tmp_path / "one.json").read_text())
        assert (one["accuracy"], one["loss"], one["rank"]) == (row["accuracy"], row["loss"], row["rank"])
    if strategy == "hetlora":
        assert rows[-1]["rank"] == rows[0]["rank"] and rows[-1]["accuracy"] == rows[0]["accuracy"]  # r_max: global
        assert rows[1]["rank"] < rows[0]["rank"]
    else:  # HomLoRA sends every client the global rank-2 adapter
        assert {r["rank"] for r in rows} == {2} and len({r["accuracy"] for r in rows}) == 1


@pytest.mark.parametrize("args, msg", [(["--eval-samples", "-1"], "--eval-samples must be >= 0"),
                                       (["--batch-size", "0"], "--batch-size must be >= 1"),
                                       (["--client", "9"], "client must lie in"),
                                       (["--device", "gpu0"], "is not a torch device")])
def test_evaluate_refuses_bad_arguments(tmp_path, capsys, args, msg):
    _run(tmp_path, rounds=1)
    assert main(["evaluate", str(tmp_path / "run"), *args]) == 2
    assert msg in capsys.readouterr().err


def test_evaluate_without_a_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    assert "not a run directory: it has no config.json" in capsys.readouterr().err
    (tmp_path / "empty" / "config.json").write_text("{broken")
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    assert "FedConfig JSON: cannot parse" in capsys.readouterr().err
