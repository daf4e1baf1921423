"""Metrics files, plots (matplotlib, Agg backend) and comparison tables of simulation runs.

A run's ``metrics.jsonl`` has one record per round (see `Simulation.run_round`); the
functions here read any number of run directories and write PNGs / markdown.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "read_metrics",
    "read_config",
    "plot_accuracy",
    "plot_rank_histogram",
    "plot_comm_vs_accuracy",
    "plot_perplexity",
    "comparison_table",
    "plot_runs",
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (``FileNotFoundError`` if absent).

    A last line that does not parse is left out with a warning: a run killed while it appended
    the line leaves it cut short (the run's resume rewrites the file).  A bad line before the
    last is damage, not an interrupted append: ``ValueError`` naming the file and the line."""
    p = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not p.exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a simulation run directory")
    lines = [(i, line) for i, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
    out = []
    for n, (i, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if n < len(lines) - 1:
                raise ValueError(f"{p}, line {i}: not a JSON record ({e})") from None
            warnings.warn(f"{p}: the last line is cut short (a run killed while writing it?): left out",
                          RuntimeWarning, stacklevel=2)
    return out


def read_config(run_dir: str | Path) -> dict:
    p = Path(run_dir) / "config.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run_dir: Path, cfg: dict) -> str:
    return cfg.get("run_name") or run_dir.name


def _lines(runs: Mapping[str, Sequence[dict]], path: str | Path, point, xlabel: str, ylabel: str, title: str,
           log_y: bool = False) -> Path:
    """One line per run of ``point(record)`` (an ``(x, y)`` pair, or None to leave it out)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs.items():
        pts = [p for p in map(point, recs) if p is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", ms=3, label=label)
    if log_y:
        ax.set_yscale("log")
    if xlabel == "round":
        ax.xaxis.set_major_locator(_int_ticks())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _accuracy_lines(runs: Mapping[str, Sequence[dict]], path: str | Path, x_of, xlabel: str, title: str) -> Path:
    """One line per run of global test accuracy (%) against ``x_of(record)``, over the
    records that were evaluated (and for which ``x_of`` is defined)."""
    def point(r: dict):
        x = x_of(r)
        return None if r.get("eval_acc") is None or x is None else (x, 100 * r["eval_acc"])

    return _lines(runs, path, point, xlabel, _accuracy_name(runs) + " (%)", title)


def _int_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _accuracy_name(runs: Mapping[str, Sequence[dict]]) -> str:
    """What ``eval_acc`` measures: a causal LM's records carry ``eval_ppl``, and their accuracy is
    next-token accuracy."""
    causal = {any("eval_ppl" in r for r in recs) for recs in runs.values() if recs}
    if causal == {True}:
        return "global next-token accuracy"
    return "global test accuracy" if causal == {False} else "global test / next-token accuracy"


def plot_perplexity(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """A causal LM's global test perplexity vs round, one line per run (log scale)."""
    return _lines(runs, path, lambda r: None if r.get("eval_ppl") is None else (r["round"], r["eval_ppl"]),
                  "round", "global test perplexity", title or "perplexity vs round", log_y=True)


def plot_accuracy(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Global test accuracy vs round, one line per run."""
    return _accuracy_lines(runs, path, lambda r: r["round"], "round", title or "accuracy vs round")


def plot_rank_histogram(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Heat map: number of clients at each rank (y) after each round (x)."""
    plt = _plt()
    ranks = [r["client_ranks"] for r in records]
    rmax = max(max(x) for x in ranks)
    grid = np.zeros((rmax + 1, len(ranks)))
    for j, rs in enumerate(ranks):
        for v in rs:
            grid[v, j] += 1
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                   extent=(records[0]["round"] - 0.5, records[-1]["round"] + 0.5, -0.5, rmax + 0.5))
    cb = fig.colorbar(im, ax=ax, label="clients")
    cb.locator = _int_ticks()
    cb.update_ticks()
    ax.xaxis.set_major_locator(_int_ticks())
    ax.yaxis.set_major_locator(_int_ticks())
    ax.set_xlabel("round")
    ax.set_ylabel("client rank (after pruning)")
    ax.set_title(title or "rank histogram over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_comm_vs_accuracy(runs: Mapping[str, Sequence[dict]], path: str | Path, title: str = "") -> Path:
    """Global test accuracy vs cumulative bytes (up + down), one line per run."""

    def mb(r: dict) -> float | None:
        return (r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6 if "cum_bytes_up" in r else None

    return _accuracy_lines(
        runs, path, mb, "cumulative communication, up + down (MB)", title or "communication vs accuracy"
    )


def comparison_table(runs: Mapping[str, Sequence[dict]]) -> str:
    """Markdown table: final / best accuracy, rounds, MB up / down, mean final rank, wall time."""
    acc = "next-token acc" if _accuracy_name(runs) == "global next-token accuracy" else "acc"
    lines = [f"| run | final {acc} (%) | best {acc} (%) | rounds | MB up | MB down | mean rank (end) | rejected "
             "| wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, recs in runs.items():
        accs = [r["eval_acc"] for r in recs if r.get("eval_acc") is not None]
        last = recs[-1] if recs else {}
        up = sum(r.get("bytes_up_total", 0) for r in recs) / 1e6
        down = sum(r.get("bytes_down_total", 0) for r in recs) / 1e6
        mr = float(np.mean(last.get("client_ranks", [0]))) if recs else 0.0
        rej = sum(r.get("num_rejected", 0) for r in recs)
        wall = sum(r.get("wall_time", 0.0) for r in recs)
        fin = f"{100 * accs[-1]:.2f}" if accs else "-"
        best = f"{100 * max(accs):.2f}" if accs else "-"
        lines.append(f"| {label} | {fin} | {best} | {len(recs)} | {up:.2f} | {down:.2f} | {mr:.2f} | {rej} | "
                     f"{wall:.0f} |")
    return "\n".join(lines) + "\n"


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
              prefix: str = "") -> list[Path]:
    """All plots for the given runs into ``out_dir`` (default: the first run's directory):
    ``accuracy.png``, ``comm_vs_accuracy.png`` and one ``ranks_<run>.png`` per run, plus
    ``comparison.md`` when more than one run is given."""
    dirs = [Path(d) for d in run_dirs]
    out = Path(out_dir) if out_dir is not None else dirs[0]
    runs = {}
    for d in dirs:  # every run read before anything is made: a mistyped one leaves nothing behind
        label = _label(d, read_config(d))
        if label in runs:
            label = str(d)
        runs[label] = read_metrics(d)
    if not any(runs.values()):
        raise ValueError(f"nothing to plot: no round recorded in the metrics.jsonl of {[str(d) for d in dirs]}")
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_accuracy(runs, out / f"{prefix}accuracy.png"),
               plot_comm_vs_accuracy(runs, out / f"{prefix}comm_vs_accuracy.png")]
    if any("eval_ppl" in r for recs in runs.values() for r in recs):
        written.append(plot_perplexity(runs, out / f"{prefix}perplexity.png"))
    for label, recs in runs.items():
        if recs:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
            written.append(plot_rank_histogram(recs, out / f"{prefix}ranks_{safe}.png", title=f"ranks: {label}"))
    if len(runs) > 1:
        p = out / f"{prefix}comparison.md"
        p.write_text(comparison_table(runs))
        written.append(p)
    return written
