"""The hetlora command line: --help of every subcommand, a tiny simulate/compare/export/plot."""

import json

import pytest

from hetlora.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--model", "tiny-random-bert", "--dataset", "synthetic", "--num-clients", "4", "--clients-per-round", "2",
        "--rounds", "1", "--local-steps", "2", "--batch-size", "4", "--r-min", "1", "--r-max", "4",
        "--tiers", "0.5:min,0.5:max", "--eval-samples", "20", "--no-progress", "--no-plots", "--quiet"]


@pytest.mark.parametrize("cmd", ["simulate", "reproduce", "export", "plot", "bench"])
def test_help_of_each_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hetlora {cmd}")
    if cmd == "simulate":
        for flag in ("--strategy", "--clients-per-round", "--dirichlet-alpha", "--gamma", "--lam", "--compare",
                     "--resume", "--config", "--scaling-rule", "--mode"):
            assert flag in out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("simulate", "reproduce", "export", "plot", "bench"))


def test_simulate_export_plot(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["eval_acc"] is not None
    assert main(["export", str(run), str(tmp_path / "g"), "--global"]) == 0
    assert (tmp_path / "g" / "adapter_model.safetensors").exists()
    assert main(["export", str(run), str(tmp_path / "c1"), "--client", "1"]) == 0
    assert (tmp_path / "c1" / "adapter_config.json").exists()
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy.png").exists()


def test_plot_reads_a_run_killed_while_it_wrote_its_metrics(tmp_path, capsys):
    """A last metrics line cut short by a kill is left out (with a warning), as a resume leaves it
    out; a bad line before the last is damage, named by file and line."""
    from hetlora.fl.report import read_metrics

    assert main(["simulate", *TINY, "--rounds", "2", "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    with pytest.warns(RuntimeWarning, match="last line is cut short"):
        assert [r["round"] for r in read_metrics(run)] == [1]
    with pytest.warns(RuntimeWarning):
        assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    (run / "metrics.jsonl").write_text(lines[0][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        read_metrics(run)


def test_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: flexlora\nrounds: 7\nlam: 0.2\n")
    assert main(["simulate", "--config", str(cfg), "--rounds", "3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "strategy: flexlora" in out and "rounds: 3" in out and "lam: 0.2" in out
    assert main(["simulate", "--gamma", "1.5", "--print-config"]) == 2
    assert "FedConfig.gamma" in capsys.readouterr().err


def test_compare_writes_one_table(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out-dir", str(tmp_path), "--run-name", "cmp",
                 "--compare", "hetlora", "homlora@1"]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| hetlora |" in table and "| homlora_r1 |" in table
    a = json.loads((tmp_path / "cmp" / "hetlora" / "metrics.jsonl").read_text().splitlines()[0])
    b = json.loads((tmp_path / "cmp" / "homlora_r1" / "metrics.jsonl").read_text().splitlines()[0])
    assert a["clients"] == b["clients"]  # same seed, same sampled clients
    assert set(b["ranks_received"]) == {1}
