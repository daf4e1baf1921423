"""`hetlora reproduce 20ng`: the grid runner and its summary, on the smoke scale (tiny random model)."""

import json

import numpy as np
import pytest

from hetlora.cli import main
from hetlora.fl.config import FedConfig
from hetlora.fl.reproduce import SCALES, SEED_TABLE, Grid, grid_command, run_grid, summarize

pytestmark = pytest.mark.usefixtures("one_thread")


def _finals(root, tag, name):
    recs = [json.loads(x) for x in (root / tag / name / "metrics.jsonl").read_text().splitlines()]
    return [100 * r["eval_acc"] for r in recs if r.get("eval_acc") is not None][-1], recs


def test_grid_runs_resumes_and_summarizes(tmp_path):
    grid = Grid(out=tmp_path, scale="smoke", strategies=["hetlora", "homlora@max"], alphas=[0.5], seeds=[0, 1])
    res = run_grid(grid, jobs=2, verbose=False, say=lambda m: None)
    runs = [f"dir0.5-s{s}/{n}" for s in (0, 1) for n in ("hetlora", "homlora_r4")]
    assert sorted(res["ran"]) == runs and not res["failed"] and not res["skipped"]
    # every run used the scale's config with its own α and seed
    for s in (0, 1):
        for name in ("hetlora", "homlora_r4"):
            cfg = FedConfig.from_json(tmp_path / f"dir0.5-s{s}" / name / "config.json")
            assert cfg.seed == s and cfg.dirichlet_alpha == 0.5 and cfg.rounds == SCALES["smoke"]["rounds"]
            assert cfg.num_clients == SCALES["smoke"]["num_clients"] and cfg.tiers == [[0.5, "min"], [0.5, "max"]]
        assert FedConfig.from_json(tmp_path / f"dir0.5-s{s}" / "homlora_r4" / "config.json").hom_rank == 4
    # a second call finds everything done and runs nothing
    again = run_grid(grid, jobs=1, verbose=False, say=lambda m: None)
    assert again["ran"] == [] and sorted(again["skipped"]) == runs

    summary = summarize(grid, command="hetlora reproduce 20ng --scale smoke")
    rows = {(r["alpha"], r["strategy"]): r for r in summary["rows"]}
    assert set(rows) == {(0.5, "hetlora"), (0.5, "homlora@max")}
    for (_a, strat), row in rows.items():
        name = "hetlora" if strat == "hetlora" else "homlora_r4"
        finals = [_finals(tmp_path, f"dir0.5-s{s}", name)[0] for s in (0, 1)]
        assert row["seeds"] == 2
        np.testing.assert_allclose(row["final"], (np.mean(finals), np.std(finals, ddof=1)), rtol=1e-12)
        _, recs = _finals(tmp_path, "dir0.5-s0", name)
        assert row["rounds"] == recs[-1]["round"]
    assert rows[(0.5, "homlora@max")]["mean_rank_end"] == 4.0
    md = (tmp_path / "summary.md").read_text()
    # synthetic data: no seed-table number beside it (test_user_audit checks the 20 Newsgroups case)
    assert f"{SEED_TABLE[0.5]:.2f}" not in md and "HomLoRA r_max" in md and "--scale smoke" in md
    assert (tmp_path / "accuracy_by_alpha.png").stat().st_size > 0
    assert (tmp_path / "final_accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][0]["strategy"] == "hetlora"


def test_budget_leaves_groups_for_a_later_run(tmp_path):
    grid = Grid(out=tmp_path, scale="smoke", strategies=["zeropad"], alphas=[0.5, 0.1], seeds=[0])
    res = run_grid(grid, jobs=1, budget_s=0.0, verbose=False, say=lambda m: None)
    assert res["ran"] == [] and res["not_started"] == ["dir0.5-s0/zeropad", "dir0.1-s0/zeropad"]


def test_command_line_carries_overrides_and_resolves_hom_ranks(tmp_path):
    grid = Grid(out=tmp_path, scale="reduced", strategies=["homlora@min", "homlora@max", "flora"],
                overrides={"rounds": 3, "r_max": 8})
    assert grid.compare_names() == ["homlora@2", "homlora@8", "flora"]
    cmd = grid_command(grid, 0.01, 2, threads=1, strategy="flora")
    assert cmd[cmd.index("--rounds") + 1] == "3" and cmd[cmd.index("--dirichlet-alpha") + 1] == "0.01"
    assert cmd[cmd.index("--seed") + 1] == "2" and "--resume" in cmd and "--no-plots" not in cmd
    assert cmd[cmd.index("--threads") + 1] == "1" and cmd[cmd.index("--strategy") + 1] == "flora"
    one = grid_command(grid, 0.5, 1, threads=None, strategy="homlora@8")
    assert one[one.index("--strategy") + 1] == "homlora" and one[one.index("--hom-rank") + 1] == "8"
    assert one[one.index("--run-name") + 1] == "homlora_r8" and one[one.index("--out-dir") + 1].endswith("dir0.5-s1")
    assert "--compare" not in one and "--threads" not in one
    pinned = Grid(out=tmp_path, scale="long", strategies=["hetlora"], overrides={"threads": 1})
    cmd = grid_command(pinned, 0.5, 0, threads=2, strategy="hetlora")
    assert cmd.count("--threads") == 1 and cmd[cmd.index("--threads") + 1] == "1"  # --set threads=1 wins
    assert cmd[cmd.index("--rounds") + 1] == "40" and cmd[cmd.index("--eval-samples") + 1] == "0"


@pytest.mark.parametrize("kw,field", [
    ({"scale": "huge"}, "scale"), ({"strategies": ["fedprox"]}, "strategies"), ({"alphas": [0.0]}, "alphas"),
    ({"seeds": [-1]}, "seeds"), ({"overrides": {"rounds": 0}}, "rounds"),
])
def test_bad_grids_name_the_argument(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        Grid(out=tmp_path, **kw).config()


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["reproduce", "20ng", "--scale", "smoke", "--out", str(tmp_path), "--set", "rounds"]) == 2
    assert "--set" in capsys.readouterr().err
    assert main(["reproduce", "20ng", "--out", str(tmp_path), "--strategies", "nope"]) == 2
    assert "strategies" in capsys.readouterr().err


def test_a_failing_run_is_reported_with_its_log_and_the_rest_go_on(tmp_path):
    grid = Grid(out=tmp_path, scale="smoke", strategies=["hetlora"], alphas=[0.5], seeds=[0, 1],
                overrides={"dataset": str(tmp_path / "missing.csv")})
    res = run_grid(grid, jobs=1, verbose=False, say=lambda m: None)
    assert [f["run"] for f in res["failed"]] == ["dir0.5-s0/hetlora", "dir0.5-s1/hetlora"]
    assert all(f["rc"] == 2 for f in res["failed"])
    assert "data file not found" in open(res["failed"][0]["log"]).read()


def test_summary_leaves_out_unfinished_runs(tmp_path):
    grid = Grid(out=tmp_path, scale="smoke", strategies=["hetlora"], alphas=[0.5], seeds=[0, 1])
    for s, rounds in ((0, 2), (1, 1)):  # seed 1 stopped after round 1 of 2
        d = tmp_path / f"dir0.5-s{s}" / "hetlora"
        d.mkdir(parents=True)
        recs = [{"round": r, "eval_acc": 0.1 * (r + s), "bytes_up_total": 10, "ranks_sent": [2]}
                for r in range(1, rounds + 1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = summarize(grid)["rows"]
    assert len(rows) == 1 and rows[0]["seeds"] == 1 and rows[0]["final"] == (pytest.approx(20.0), 0.0)
