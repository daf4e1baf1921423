"""``hetlora reproduce 20ng``: the seed table's 20 Newsgroups experiment, every strategy x
Dirichlet α x seed, at a chosen scale, then one summary table and plots.

The seed's benchmark table reports HetLoRA on 20 Newsgroups with Dirichlet(α) client
splits: 37.34 % (α = 0.01), 61.57 % (α = 0.1), 68.12 % (α = 0.5) test accuracy.  This
module runs the grid as ``hetlora simulate`` processes (one per strategy, α and seed,
``--jobs`` of them at a time), each resumable: re-running the same command skips finished
runs and continues unfinished ones from their last checkpoint, so a grid can be spread
over several sessions (the ``full`` scale on a GPU is meant to be).

Layout of ``--out``::

    dir0.5-s0/<strategy>/metrics.jsonl ...   one run directory per (α, seed, strategy)
    logs/dir0.5-s0-<strategy>.log            that process's output
    summary.md, summary.json                 the table (mean ± std over seeds)
    accuracy_by_alpha.png                    mean accuracy vs round, one panel per α
    final_accuracy.png                       final accuracy per strategy and α, seed table marked
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SEED_TABLE", "SCALES", "STRATEGY_ORDER", "Grid", "run_grid", "summarize", "grid_command"]

#: HetLoRA's test accuracy (%) on 20 Newsgroups in the seed's benchmark table, by Dirichlet α.
SEED_TABLE: dict[float, float] = {0.01: 37.34, 0.1: 61.57, 0.5: 68.12}

#: Strategies of the table, in display order; homlora@min / homlora@max are HomLoRA at r_min / r_max.
STRATEGY_ORDER = ["hetlora", "homlora@min", "homlora@max", "zeropad", "flexlora", "flora", "fullft"]

#: FedConfig overrides per scale.  ``reduced`` is sized so the whole grid (7 strategies x 3 α x
#: 3 seeds = 63 runs) takes about an hour on a 2-core CPU with --jobs 2; ``long`` is the default
#: job's clients and steps for 40 rounds, scored on the whole test set (about 25 min a run on one
#: CPU thread: meant for a few strategies and one seed); ``full`` is for a GPU.
SCALES: dict[str, dict] = {
    "smoke": dict(model="tiny-random-bert", dataset="synthetic", num_clients=6, clients_per_round=3, rounds=2,
                  local_steps=2, batch_size=4, r_min=1, r_max=4, max_length=16, eval_samples=24,
                  client_eval_samples=4, tiers=[[0.5, "min"], [0.5, "max"]], export_clients=0, plots=False),
    "reduced": dict(num_clients=20, clients_per_round=5, rounds=12, local_steps=5, batch_size=8, max_length=48,
                    eval_every=3, eval_samples=512, export_clients=0),
    "long": dict(num_clients=20, clients_per_round=8, rounds=40, local_steps=8, batch_size=8, max_length=64,
                 eval_every=10, eval_samples=0, export_clients=0),
    "full": dict(num_clients=100, clients_per_round=10, rounds=50, local_steps=20, batch_size=16, max_length=128,
                 eval_every=5, eval_samples=0, export_clients=0, device="cuda"),
}

_LABELS = {"hetlora": "HetLoRA", "homlora@min": "HomLoRA r_min", "homlora@max": "HomLoRA r_max",
           "zeropad": "zero-pad avg", "flexlora": "FlexLoRA", "flora": "FLoRA", "fullft": "full FT"}


def _alpha_tag(a: float) -> str:
    return f"dir{a:g}"


@dataclass
class Grid:
    """What to run: strategies x alphas x seeds at ``scale`` (plus per-field ``overrides``)."""

    out: Path
    scale: str = "reduced"
    strategies: list[str] = field(default_factory=lambda: list(STRATEGY_ORDER))
    alphas: list[float] = field(default_factory=lambda: sorted(SEED_TABLE))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.scale not in SCALES:
            raise ValueError(f"scale: must be one of {list(SCALES)}, got {self.scale!r}")
        bad = [s for s in self.strategies if s not in STRATEGY_ORDER]
        if bad or not self.strategies:
            raise ValueError(f"strategies: unknown {bad} (choose from {STRATEGY_ORDER})")
        if not self.alphas or any(not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0)
                                  for a in self.alphas):
            raise ValueError(f"alphas: must be positive numbers, got {self.alphas!r}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds: must be non-negative ints, got {self.seeds!r}")

    def config(self) -> dict:
        """The scale's FedConfig fields with the overrides applied (validated by FedConfig)."""
        from .config import FedConfig

        cfg = {**SCALES[self.scale], **self.overrides}
        FedConfig.from_dict(cfg)  # raises ValueError naming a bad (or unknown) field
        return cfg

    def compare_names(self) -> list[str]:
        """The strategies as ``--compare``-style items: homlora@min/max resolved to the scale's
        r_min / r_max (homlora@2)."""
        from .config import FedConfig

        c = FedConfig.from_dict(self.config())
        sub = {"homlora@min": f"homlora@{c.r_min}", "homlora@max": f"homlora@{c.r_max}"}
        return [sub.get(s, s) for s in self.strategies]

    def groups(self) -> list[tuple[float, int]]:
        # seed-major: a grid cut short by a budget still covers every α
        return [(a, s) for s in self.seeds for a in self.alphas]


def _flag(k: str, v) -> list[str]:
    name = "--" + k.replace("_", "-")
    if isinstance(v, bool):
        return [name if v else "--no-" + k.replace("_", "-")]
    if k == "tiers":
        return [name, ",".join(f"{f}:{r}" for f, r in v)]
    if isinstance(v, (list, tuple)):
        return [name, *map(str, v)]
    return [name, str(v)]


def _label(name: str) -> str:
    """Run directory name of a ``--compare``-style strategy item (homlora@2 -> homlora_r2)."""
    return name.replace("@", "_r")


def _run_dir(grid: Grid, alpha: float, seed: int, strategy: str) -> Path:
    return grid.out / f"{_alpha_tag(alpha)}-s{seed}" / _label(strategy)


def _finished_records(run_dir: Path, rounds: int) -> list[dict] | None:
    """The run's metrics records if it reached ``rounds``, else None (absent or unfinished)."""
    from .report import read_metrics

    if not (run_dir / "metrics.jsonl").exists():
        return None
    recs = read_metrics(run_dir)
    return recs if recs and recs[-1].get("round", 0) >= rounds else None


def grid_command(grid: Grid, alpha: float, seed: int, threads: int | None, strategy: str) -> list[str]:
    """The ``hetlora simulate`` command line of one run (``strategy``: a `compare_names` item)."""
    name, _, rank = strategy.partition("@")
    run_dir = _run_dir(grid, alpha, seed, strategy)
    cmd = [sys.executable, "-m", "hetlora", "simulate", "--strategy", name, *(["--hom-rank", rank] if rank else []),
           "--out-dir", str(run_dir.parent), "--run-name", run_dir.name,
           "--resume", "--quiet", "--dirichlet-alpha", f"{alpha:g}", "--seed", str(seed)]
    cfg = grid.config()
    for k, v in cfg.items():
        if k in ("dirichlet_alpha", "seed", "out_dir", "run_name", "progress", "strategy", "hom_rank"):
            continue
        cmd += _flag(k, v)
    if threads and cfg.get("threads") is None:  # `--set threads=N` wins over cores / jobs
        cmd += ["--threads", str(threads)]
    return cmd


def run_grid(grid: Grid, jobs: int = 1, budget_s: float | None = None, verbose: bool = True,
             say: Callable[[str], None] | None = None) -> dict:
    """Run every unfinished run of the grid, one ``hetlora simulate`` process per (α, seed,
    strategy), ``jobs`` at a time (seed-major, so a grid cut short covers every α); returns
    ``{"ran": [...], "skipped": [...], "failed": [{run, rc, log}], "not_started": [...]}``
    with runs named ``dir<α>-s<seed>/<strategy>``.

    No new run starts once ``budget_s`` seconds have passed (running ones finish); a run
    killed half-way resumes from its last checkpoint next time."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: must be an int >= 1, got {jobs!r}")
    say = say or (lambda m: print(m, flush=True))
    from .config import FedConfig

    rounds = FedConfig.from_dict(grid.config()).rounds
    grid.out.mkdir(parents=True, exist_ok=True)
    (grid.out / "logs").mkdir(exist_ok=True)
    _write_grid(grid)
    units = [(a, s, n) for a, s in grid.groups() for n in grid.compare_names()]
    tag = lambda a, s, n: f"{_alpha_tag(a)}-s{s}/{_label(n)}"  # noqa: E731
    todo = [u for u in units if _finished_records(_run_dir(grid, *u), rounds) is None]
    result: dict = {"ran": [], "skipped": [tag(*u) for u in units if u not in todo], "failed": [],
                    "not_started": []}
    threads = max(1, (os.cpu_count() or 1) // jobs) if grid.config().get("device", "cpu") == "cpu" else None
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.monotonic()

    def one(a: float, s: int, n: str) -> tuple[str, int, Path, float]:
        log = grid.out / "logs" / f"{_alpha_tag(a)}-s{s}-{_label(n)}.log"
        cmd = grid_command(grid, a, s, threads, strategy=n)
        t = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        return tag(a, s, n), rc, log, time.monotonic() - t

    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"reproduce 20ng ({grid.scale})", unit="run")
    pending = list(todo)
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        futs: dict = {}

        def submit_next() -> None:
            while pending and len(futs) < jobs:
                if budget_s is not None and time.monotonic() - t0 > budget_s:
                    result["not_started"] += [tag(*u) for u in pending]
                    pending.clear()
                    return
                u = pending.pop(0)
                futs[ex.submit(one, *u)] = u

        submit_next()
        while futs:
            done = next(as_completed(futs))
            futs.pop(done)
            name, rc, log, dt = done.result()
            if rc == 0:
                result["ran"].append(name)
                msg = f"{name}: done in {dt:.0f}s"
            else:
                result["failed"].append({"run": name, "rc": rc, "log": str(log)})
                msg = f"{name}: FAILED (exit {rc}); see {log}"
            if bar is not None:
                bar.update(1)
                bar.write(msg)
            else:
                say(msg)
            submit_next()
    if bar is not None:
        bar.close()
    return result


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def _collect(grid: Grid) -> dict:
    """``{alpha: {strategy: [records of seed 0, seed 1, ...]}}`` for the runs that have finished."""
    from .config import FedConfig

    rounds = FedConfig.from_dict(grid.config()).rounds
    names = dict(zip(grid.strategies, grid.compare_names()))
    out: dict = {}
    for a in grid.alphas:
        for strat, name in names.items():
            for s in grid.seeds:
                recs = _finished_records(_run_dir(grid, a, s, name), rounds)  # unfinished runs are left out
                if recs is not None:
                    out.setdefault(a, {}).setdefault(strat, []).append(recs)
    return out


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(xs, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _fmt(m: float, s: float, n: int) -> str:
    return f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}"


def _write_grid(grid: Grid) -> None:
    """``grid.json``: the grid last run or summarised (a summary's grid may span several runs' calls)."""
    grid.out.mkdir(parents=True, exist_ok=True)
    (grid.out / "grid.json").write_text(json.dumps(
        {"scale": grid.scale, "strategies": grid.strategies, "alphas": grid.alphas, "seeds": grid.seeds,
         "overrides": grid.overrides, "config": grid.config()}, indent=1, default=str) + "\n")


def summarize(grid: Grid, command: str = "") -> dict:
    """Write summary.md / summary.json / the two plots (and grid.json) for whatever runs exist;
    returns the summary."""
    _write_grid(grid)
    data = _collect(grid)
    rows = []
    for a in grid.alphas:
        for strat in grid.strategies:
            runs = data.get(a, {}).get(strat, [])
            if not runs:
                continue
            finals, bests, mids, ups, ranks, failed, complete = [], [], [], [], [], 0, 0
            for recs in runs:
                ev = [(r["round"], 100 * r["eval_acc"]) for r in recs if r.get("eval_acc") is not None]
                if not ev:
                    continue
                finals.append(ev[-1][1])
                bests.append(max(v for _, v in ev))
                mids.append(ev[(len(ev) - 1) // 2][1])
                ups.append(sum(r.get("bytes_up_total", 0) for r in recs) / 1e6)
                sent = [x for x in recs[-1].get("ranks_sent", []) if x] if strat != "fullft" else []
                if sent:
                    ranks.append(float(np.mean(sent)))
                failed += sum(1 for r in recs if r.get("failed"))
                complete += 1
            if not finals:
                continue
            rows.append({"alpha": a, "strategy": strat, "seeds": complete,
                         "final": _ms(finals), "best": _ms(bests), "mid": _ms(mids),
                         "mb_up": float(np.mean(ups)),
                         "mean_rank_end": float(np.mean(ranks)) if ranks else None,
                         "failed_rounds": failed, "finals": finals,
                         "rounds": max(r["round"] for recs in runs for r in recs)})
    summary = {"scale": grid.scale, "config": grid.config(), "seeds": grid.seeds, "command": command,
               "seed_table_hetlora": {str(k): v for k, v in SEED_TABLE.items()}, "rows": rows}
    grid.out.mkdir(parents=True, exist_ok=True)
    (grid.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (grid.out / "summary.md").write_text(summary_markdown(summary))
    if rows:
        try:
            plot_grid(grid, data, summary)
        except Exception as e:  # plots are a convenience: the table is already written
            print(f"reproduce: plotting failed: {e}", file=sys.stderr)
    return summary


def _is_20ng(cfg: Mapping) -> bool:
    return cfg.get("dataset", "20newsgroups") == "20newsgroups"


def summary_markdown(summary: Mapping) -> str:
    """The table: per α and strategy, final / mid-run / best accuracy (mean ± std over seeds), MB uploaded."""
    cfg = summary["config"]
    lines = [f"Scale `{summary['scale']}`: {cfg.get('num_clients')} clients, {cfg.get('clients_per_round')} per "
             f"round, {cfg.get('rounds')} rounds of {cfg.get('local_steps')} local steps (batch "
             f"{cfg.get('batch_size')}, {cfg.get('max_length')} tokens), accuracy on "
             f"{cfg.get('eval_samples') or 'all'} test documents; mean ± std over seeds.", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    lines += ["| α | strategy | seeds | final acc (%) | mid-run acc (%) | best acc (%) | seed table (HetLoRA) "
              "| MB up / run | mean rank sent (last round) | failed rounds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    on_20ng = _is_20ng(cfg)  # the smoke scale's synthetic data has no seed-table row beside it
    for r in summary["rows"]:
        ref = SEED_TABLE.get(r["alpha"]) if r["strategy"] == "hetlora" and on_20ng else None
        n = r["seeds"]
        rank = "-" if r["mean_rank_end"] is None else f"{r['mean_rank_end']:.2f}"
        lines.append(f"| {r['alpha']:g} | {_LABELS.get(r['strategy'], r['strategy'])} | {n} | {_fmt(*r['final'], n)} "
                     f"| {_fmt(*r['mid'], n)} | {_fmt(*r['best'], n)} | {'' if ref is None else f'{ref:.2f}'} "
                     f"| {r['mb_up']:.1f} | {rank} "
                     f"| {r['failed_rounds']} |")
    return "\n".join(lines) + "\n"


def plot_grid(grid: Grid, data: Mapping, summary: Mapping) -> list[Path]:
    from .report import _plt

    plt = _plt()
    alphas = [a for a in grid.alphas if a in data]
    fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 4), squeeze=False)
    for ax, a in zip(axes[0], alphas):
        for strat in grid.strategies:
            runs = data[a].get(strat)
            if not runs:
                continue
            by_round: dict[int, list[float]] = {}
            for recs in runs:
                for r in recs:
                    if r.get("eval_acc") is not None:
                        by_round.setdefault(r["round"], []).append(100 * r["eval_acc"])
            xs = sorted(by_round)
            m = np.array([np.mean(by_round[x]) for x in xs])
            s = np.array([np.std(by_round[x]) for x in xs])
            (line,) = ax.plot(xs, m, marker="o", ms=3, label=_LABELS.get(strat, strat))
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.12)
        if a in SEED_TABLE and _is_20ng(summary["config"]):
            ax.axhline(SEED_TABLE[a], color="k", ls="--", lw=1, label="seed table (HetLoRA)")
        ax.set_title(f"Dirichlet α = {a:g}")
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    data_name = "20 Newsgroups" if _is_20ng(summary["config"]) else f"data set {summary['config'].get('dataset')!r}"
    fig.suptitle(f"{data_name}, scale {grid.scale}: mean ± std over seeds")
    fig.tight_layout()
    p1 = grid.out / "accuracy_by_alpha.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    strats = [s for s in grid.strategies if any(r["strategy"] == s for r in summary["rows"])]
    width = 0.8 / max(len(strats), 1)
    for i, strat in enumerate(strats):
        xs, ms, ss = [], [], []
        for j, a in enumerate(alphas):
            row = next((r for r in summary["rows"] if r["strategy"] == strat and r["alpha"] == a), None)
            if row:
                xs.append(j + (i - (len(strats) - 1) / 2) * width)
                ms.append(row["final"][0])
                ss.append(row["final"][1])
        ax.bar(xs, ms, width, yerr=ss, capsize=2, label=_LABELS.get(strat, strat))
    # the table's number is HetLoRA's: over HetLoRA's bar (the group's centre without one)
    off = (strats.index("hetlora") - (len(strats) - 1) / 2) * width if "hetlora" in strats else 0.0
    ref = [(j + off, SEED_TABLE[a]) for j, a in enumerate(alphas) if a in SEED_TABLE] if _is_20ng(summary["config"]) \
        else []
    if ref:
        ax.scatter([j for j, _ in ref], [v for _, v in ref], marker="*", s=120, color="k", zorder=5,
                   label="seed table (HetLoRA)")
    ax.set_xticks(range(len(alphas)), [f"α = {a:g}" for a in alphas])
    ax.set_ylabel("final global test accuracy (%)")
    ax.set_title(f"{'20 Newsgroups' if _is_20ng(summary['config']) else summary['config'].get('dataset')}, "
                 f"scale {grid.scale}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p2 = grid.out / "final_accuracy.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]
