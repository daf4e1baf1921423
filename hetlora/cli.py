"""The ``hetlora`` command line: ``simulate``, ``reproduce``, ``export``, ``predict``, ``evaluate``, ``plot``,
``bench``.

``hetlora simulate`` with no flags runs the default simulation (real 20 Newsgroups,
all-MiniLM-L6-v2, 20 clients with mixed ranks, HetLoRA); every `FedConfig` field is a
flag (``--clients-per-round 8``), ``--config run.yaml`` loads a file first (flags win).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _kind(f: dataclasses.Field) -> str:
    t = str(f.type).replace(" ", "")
    for k in ("bool", "int", "float", "str"):
        if t in (k, f"{k}|None"):
            return k
    if t.startswith("list[int]"):
        return "list[int]"
    if t.startswith("list[str]"):
        return "list[str]"
    return "str"  # tiers: parsed by FedConfig from "0.5:min,0.3:8,0.2:max"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from hetlora.fl import config as C
    from hetlora.fl.config import FedConfig

    docs = C.field_docs()
    choices = {"strategy": C.STRATEGIES, "aggregation": C.AGGREGATIONS, "task": C.TASKS,
               "scaling_rule": C.SCALING_RULES, "rank_rule": C.RANK_RULES, "partition": C.PARTITIONS,
               "mode": C.MODES, "dtype": C.DTYPES, "backend": C.BACKENDS}
    g = p.add_argument_group("configuration (FedConfig fields; defaults shown)")
    for f in dataclasses.fields(FedConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f)
        doc = docs.get(f.name, f.name.replace("_", " "))
        if f.name == "tiers":  # in the flag's own syntax
            shown = ",".join(f"{frac:g}:{rank}" for frac, rank in default)
        else:
            shown = repr(default)
        # a field left unset by default says in its doc what that means
        tail = "" if default is None and ("default" in doc or "None" in doc) else f" (default: {shown})"
        help_ = f"{doc}{tail}".replace("%", "%%")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if f.name in choices:  # shown, not enforced: FedConfig's own error names the field
            kw["metavar"] = "{" + ",".join(choices[f.name]) + "}"
        if kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind == "int":
            g.add_argument(flag, type=int, metavar="N", **kw)
        elif kind == "float":
            g.add_argument(flag, type=float, metavar="X", **kw)
        elif kind == "list[int]":
            g.add_argument(flag, type=int, nargs="+", metavar="R", **kw)
        elif kind == "list[str]":
            g.add_argument(flag, nargs="+", metavar="NAME", **kw)
        else:
            kw.setdefault("metavar", f.name.upper() if f.name != "tiers" else "FRAC:RANK,...")
            g.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    from hetlora import __version__
    from hetlora.fl.config import RESUME_MAY_CHANGE, STRATEGIES

    p = argparse.ArgumentParser(prog="hetlora", description="Federated fine-tuning with heterogeneous LoRA ranks.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"hetlora {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("simulate", help="run a federated simulation (default: HetLoRA on real 20 Newsgroups)",
                       description="Run a federated simulation and write a run directory (config, metrics.jsonl, "
                                   "checkpoints, peft adapters, plots) under --out-dir/--run-name.")
    s.add_argument("--config", metavar="FILE", help="a .yaml/.yml/.json FedConfig file; flags override it")
    s.add_argument("--compare", nargs="+", metavar="STRATEGY",
                   help=f"run several strategies on the same seed, clients and data and write comparison.md and "
                        f"plots; names from {list(STRATEGIES)}, homlora@R for HomLoRA at rank R")
    s.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its latest checkpoint, with the settings "
                        "it was made with (repeat them, or pass --config RUN_DIR/config.yaml); only "
                        f"{', '.join(sorted(RESUME_MAY_CHANGE))} may differ, and not device or mode with LoRA "
                        "dropout; anything else is refused, naming it")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the run directory (deleted first); without it, or --resume, "
                        "a run directory that holds a run is refused")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no per-round lines")
    s.add_argument("--print-config", action="store_true", help="print the resolved configuration (YAML) and exit")
    _add_config_flags(s)

    r = sub.add_parser(
        "reproduce", help="run the seed table's 20 Newsgroups grid (every strategy x Dirichlet α x seed)",
        description="Run every strategy x α in {0.01, 0.1, 0.5} x 3 seeds on real 20 Newsgroups as resumable "
                    "`hetlora simulate` processes (one per run), then write summary.md/summary.json and plots beside "
                    "the seed table's HetLoRA numbers (37.34 / 61.57 / 68.12 %). Re-running the same command "
                    "skips finished runs and resumes unfinished ones.")
    r.add_argument("task", choices=["20ng"], help="the experiment (20ng: 20 Newsgroups, the seed table's row)")
    r.add_argument("--scale", choices=["reduced", "long", "full", "smoke"], default="reduced",
                   help="reduced: the whole grid in ~1 h on a 2-core CPU with --jobs 2; long: the default job's "
                        "clients and steps for 40 rounds, scored on the whole test set (~25 min a run on one CPU "
                        "thread: pick a few --strategies and --seeds); full: for a GPU (device cuda); smoke: a "
                        "tiny random model for checking the pipeline (default: reduced)")
    r.add_argument("--out", metavar="DIR", help="output directory (default: results/20ng/reproduce-<scale>)")
    r.add_argument("--jobs", type=int, metavar="N", default=None,
                   help="simulations run at once, each with cores/N threads unless --set threads=N says "
                        "otherwise (default: 2 on CPU, 1 on GPU)")
    r.add_argument("--seeds", type=int, nargs="+", metavar="S", default=[0, 1, 2], help="(default: 0 1 2)")
    r.add_argument("--alphas", type=float, nargs="+", metavar="A", default=[0.01, 0.1, 0.5],
                   help="Dirichlet α values (default: 0.01 0.1 0.5)")
    r.add_argument("--strategies", nargs="+", metavar="NAME", default=None,
                   help="subset of hetlora homlora@min homlora@max zeropad flexlora flora fullft (default: all)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a FedConfig field of the scale, e.g. --set rounds=20 (repeatable)")
    r.add_argument("--budget-s", type=float, metavar="S", default=None,
                   help="start no new run after S seconds (a later call resumes the rest)")
    r.add_argument("--summarize-only", action="store_true", help="only rebuild the summary and plots")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export a run's global or a client's adapter as a peft directory",
                       description="Write a peft adapter directory (adapter_config.json, adapter_model.safetensors, "
                                   "head.safetensors) from a run's latest checkpoint, or with --merged a standalone "
                                   "model (see there). For strategies that change the "
                                   "base model (flora merges updates into it, fullft trains it) the adapter alone is "
                                   "not the model: target_weights.safetensors holds the target layers' weights, to "
                                   "load into the base model (load_state_dict(..., strict=False)) before the adapter.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("out", metavar="OUT", help="output directory")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", type=int, metavar="K", help="client K's adapter (its current rank)")
    who.add_argument("--global", dest="glob", action="store_true",
                     help="the global adapter, at the strategy's global rank (HetLoRA: r_max; HomLoRA: its rank; "
                          "FlexLoRA and FLoRA: what their aggregation left)")
    e.add_argument("--merged", action="store_true",
                   help="write a standalone model instead: the adapter (and, for flora/fullft, the trained target "
                        "weights) merged into a copy of the base model, saved with save_pretrained, plus the "
                        "tokenizer and, for classification, head.safetensors and hetlora_head.json; "
                        "`hetlora predict OUT` labels text with it")

    pr = sub.add_parser("predict", help="label text with a classifier exported by `hetlora export --merged`",
                        description="Label each text with a merged classification export (hetlora export --merged): "
                                    "the model's last hidden states averaged over the attention mask, then the "
                                    "federated head, as in training. Prints one line per text: the label, its "
                                    "probability, and the text's start.")
    pr.add_argument("model_dir", metavar="DIR", help="a directory written by `hetlora export --merged`")
    pr.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    pr.add_argument("--file", metavar="F", help="also label every non-empty line of F ('-': standard input)")
    pr.add_argument("--top", type=int, default=1, metavar="K", help="print the K most likely labels (default 1)")
    pr.add_argument("--device", default="cpu", help="torch device (default cpu)")

    ev = sub.add_parser("evaluate", help="score a run's global (or a client's) model on its test set",
                        description="Rebuild a run from its latest checkpoint and score the global model (or the "
                                    "model client K would get now: its adapter and the global head) on the run's "
                                    "test set: accuracy and mean cross-entropy (causal LM: next-token accuracy, "
                                    "token cross-entropy and perplexity). By default every test document, whatever "
                                    "eval_samples the run used while training.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    who_ev = ev.add_mutually_exclusive_group()
    who_ev.add_argument("--client", type=int, metavar="K", help="client K's model instead of the global one")
    who_ev.add_argument("--by-rank", action="store_true",
                        help="also score the model each client rank gets now (one per distinct current rank: "
                             "every strategy here sends clients of one rank the same model)")
    ev.add_argument("--eval-samples", type=int, default=0, metavar="N",
                    help="score N test documents (the run's seeded subset rule); 0 = all (default)")
    ev.add_argument("--batch-size", type=int, default=64, metavar="B", help="evaluation batch size (default 64)")
    ev.add_argument("--device", default=None, help="torch device (default: the run's, or cpu without its GPU)")
    ev.add_argument("--json", metavar="FILE", help="also write the scores to FILE as JSON")

    pl = sub.add_parser("plot", help="plot one or more runs (accuracy, ranks, communication)",
                        description="Write accuracy.png, comm_vs_accuracy.png, ranks_<run>.png (and comparison.md "
                                    "for several runs).")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--out", metavar="DIR", help="output directory (default: the first run directory)")

    b = sub.add_parser("bench", help="run the benchmarks (python -m bench), if the bench package is present",
                       description="Delegates to `python -m bench ARGS...` (the repository's bench/ package): "
                                   "kernels (every op and backend against the baselines), e2e (concurrent vs "
                                   "sequential local training), serve (many adapters in one generation batch "
                                   "vs peft), profile (host vs device time of one LoRA call), "
                                   "report (README's Performance section from bench/results: rewrites README.md), "
                                   "env. `hetlora bench kernels --help` shows a command's own options.")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to python -m bench")
    for sp in sub.choices.values():  # `--num-client 4` must not pass for --num-clients
        sp.allow_abbrev = False
    return p


def _resolve_config(ns: argparse.Namespace):
    from hetlora.fl.config import FedConfig

    base = FedConfig.load(ns.config).to_dict() if ns.config else {}
    names = {f.name for f in dataclasses.fields(FedConfig)}
    for k, v in vars(ns).items():
        if k in names:
            base[k] = v
    if "ranks" in vars(ns) and "rank_rule" not in vars(ns):  # --ranks alone means: these ranks
        base["rank_rule"] = "list"
    return FedConfig.from_dict(base)


def _parse_compare(items: Sequence[str]) -> list[tuple[str, dict]]:
    from hetlora.fl.config import STRATEGIES

    out = []
    for item in items:
        name, _, rank = item.lower().partition("@")
        if name not in STRATEGIES:
            raise ValueError(f"--compare: unknown strategy {item!r}; choose from {list(STRATEGIES)}")
        extra: dict = {}
        if rank:
            if name != "homlora" or not rank.isdigit():
                raise ValueError(f"--compare: {item!r}: only homlora@R takes a rank")
            extra["hom_rank"] = int(rank)
        label = item.lower().replace("@", "_r")
        if any(label == done for done, _ in out):  # one run directory each: the second would meet the first
            raise ValueError(f"--compare: {item!r} is given twice")
        out.append((label, {"strategy": name, **extra}))
    return out


def _simulate(ns: argparse.Namespace) -> int:
    from hetlora.fl.report import comparison_table, plot_runs, read_metrics
    from hetlora.fl.sim import Simulation

    cfg = _resolve_config(ns)
    if ns.quiet:
        cfg.progress = False
    if ns.compare:
        _parse_compare(ns.compare)  # bad names refused before anything, --print-config included
    if ns.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if not ns.compare:
        hist = Simulation(cfg, verbose=not ns.quiet).run(resume=ns.resume, overwrite=ns.overwrite)
        acc = hist.final_accuracy
        last = next((r for r in reversed(hist.records) if "eval_ppl" in r), None)
        if last is not None:
            tail = f"  final next-token accuracy {100 * last['eval_acc']:.2f}%, perplexity {last['eval_ppl']:.2f}"
        else:
            tail = f"  final accuracy {100 * acc:.2f}%" if acc is not None else ""
        print(f"run directory: {hist.run_dir}{tail}")
        return 0
    runs = _parse_compare(ns.compare)
    root = Path(cfg.out_dir) / (cfg.run_name or f"compare_s{cfg.seed}")
    if ((root / "metrics.jsonl").exists() or (root / "checkpoints").exists()) and not ns.overwrite:
        raise ValueError(f"--compare: {str(root)!r} holds a single run, not a comparison: its plots would be "
                         "replaced; choose another --run-name (or --overwrite)")
    sims = [Simulation(cfg.replace(out_dir=str(root), run_name=label, **changes), verbose=not ns.quiet)
            for label, changes in runs]
    for sim in sims:  # every run directory checked before the first run starts
        sim.check_run_dir(ns.resume, ns.overwrite)
    dirs = []
    for sim in sims:
        sim.run(resume=ns.resume, overwrite=ns.overwrite)
        dirs.append(sim.run_dir)
    if cfg.plots:
        plot_runs(dirs, root)
    table = comparison_table({d.name: read_metrics(d) for d in dirs})
    (root / "comparison.md").write_text(table)
    print(table)
    print(f"comparison directory: {root}")
    return 0


def _parse_overrides(items: Sequence[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(val)
    return out


def _reproduce(ns: argparse.Namespace) -> int:
    from hetlora.fl.reproduce import STRATEGY_ORDER, Grid, run_grid, summarize

    out = Path(ns.out or f"results/20ng/reproduce-{ns.scale}")
    grid = Grid(out=out, scale=ns.scale, strategies=ns.strategies or list(STRATEGY_ORDER), alphas=ns.alphas,
                seeds=ns.seeds, overrides=_parse_overrides(ns.overrides))
    command = "hetlora " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("hetlora") else \
        f"hetlora reproduce 20ng --scale {ns.scale}"
    if not ns.summarize_only:
        jobs = ns.jobs if ns.jobs is not None else (1 if grid.config().get("device", "cpu") != "cpu"
                                                    else min(2, os.cpu_count() or 1))
        res = run_grid(grid, jobs=jobs, budget_s=ns.budget_s, verbose=not ns.quiet)
        print(f"runs: {len(res['ran'])} ran, {len(res['skipped'])} already done, {len(res['failed'])} failed, "
              f"{len(res['not_started'])} left for a later run")
    if ns.summarize_only:  # a summary of nothing would replace a good one: check what is there first
        import json

        if not (out / "grid.json").is_file():
            raise ValueError(f"--summarize-only: {str(out)!r} holds no grid (no grid.json): nothing to summarise; "
                             "check --out")
        was = json.loads((out / "grid.json").read_text()).get("scale")
        if was != ns.scale:
            raise ValueError(f"--summarize-only: the grid in {str(out)!r} was run at --scale {was}, not {ns.scale}")
    summary = summarize(grid, command)
    print((out / "summary.md").read_text(), end="")
    if summary["rows"]:
        print(f"summary: {out / 'summary.md'}  plots: {out / 'accuracy_by_alpha.png'}, {out / 'final_accuracy.png'}")
    else:
        print(f"summary: {out / 'summary.md'} (no finished run to summarise, no plots)")
    if not summary["rows"] or (not ns.summarize_only and res["failed"]):
        return 1
    return 0


def _check_client(ns: argparse.Namespace, sim) -> None:
    c = getattr(ns, "client", None)
    if c is None or getattr(ns, "glob", False):
        return
    if not 0 <= c < sim.config.num_clients:
        raise ValueError(f"--client must lie in [0, {sim.config.num_clients - 1}] (the run's clients), got {c}")


def _export(ns: argparse.Namespace) -> int:
    from hetlora.fl.sim import Simulation

    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT: {str(out)!r} exists and is not a directory")
    if not ns.merged and out.is_dir() and any(out.iterdir()) and not (out / "adapter_config.json").exists():
        # (a merged export checks its own target the same way)
        raise ValueError(f"OUT: {str(out)!r} is a non-empty directory that holds no peft adapter: choose a new "
                         f"or empty one (an earlier export there is replaced)")
    # on the CPU whatever the run's device: an export only writes files, and a merged one copies
    # the whole model (two copies on a GPU could exhaust it)
    sim = Simulation.from_run_dir(ns.run_dir, device="cpu")
    _check_client(ns, sim)
    if ns.merged:
        path = sim.export_merged(ns.out, None if ns.glob else ns.client)
    else:
        path = sim.export_global(ns.out) if ns.glob else sim.export_client(ns.client, ns.out)
    print(f"wrote {path}")
    return 0


def _predict(ns: argparse.Namespace) -> int:
    from hetlora.fl.merged import MergedClassifier

    if isinstance(ns.top, bool) or ns.top < 1:
        raise ValueError(f"--top must be >= 1, got {ns.top}")
    if any(not t.strip() for t in ns.texts):
        raise ValueError("TEXT: an empty text; give each text as one non-empty argument")
    texts = list(ns.texts)
    if ns.file:
        if ns.file != "-" and not Path(ns.file).is_file():
            raise ValueError(f"--file: {ns.file!r} is {'a directory' if Path(ns.file).is_dir() else 'not there'}"
                             ", expected a text file (one text per line)")
        try:
            f = sys.stdin if ns.file == "-" else open(ns.file, encoding="utf-8")
            with f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--file: cannot read {ns.file!r} as UTF-8 text ({e})") from None
    if not texts:
        raise ValueError("no text to label: give TEXT arguments or --file")
    clf = MergedClassifier.from_dir(ns.model_dir, device=ns.device)
    probs = clf.logits(texts, progress=len(texts) > 256).float().softmax(1)
    k = min(ns.top, probs.shape[1])
    p, idx = probs.topk(k, dim=1)
    for text, pi, ii in zip(texts, p.tolist(), idx.tolist()):
        labels = "  ".join(f"{clf.label_names[i]} {q:.3f}" for i, q in zip(ii, pi))
        short = " ".join(text.split())
        print(f"{labels}\t{short[:60] + ('...' if len(short) > 60 else '')}")
    return 0


def _same_model(a, b) -> bool:
    """Whether two `GlobalState`s hold the same model (then one score serves both)."""
    import torch

    ta = [*a.A, *a.B, a.head_W, a.head_b, *(a.base_weights or [])]
    tb = [*b.A, *b.B, b.head_W, b.head_b, *(b.base_weights or [])]
    return (a.scaling == b.scaling and a.stacked == b.stacked and len(ta) == len(tb)
            and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb)))


def _evaluate(ns: argparse.Namespace) -> int:
    import json
    import math

    from hetlora.fl.local import evaluate
    from hetlora.fl.sim import Simulation

    for flag, v, low in (("--eval-samples", ns.eval_samples, 0), ("--batch-size", ns.batch_size, 1)):
        if v < low:
            raise ValueError(f"{flag} must be >= {low}, got {v}")
    if ns.json and not Path(ns.json).resolve().parent.is_dir():  # before minutes of scoring, not after
        raise FileNotFoundError(f"--json: no directory {str(Path(ns.json).parent)!r} to write {ns.json!r} in")
    if ns.json and Path(ns.json).is_dir():
        raise ValueError(f"--json: {ns.json!r} is a directory; give a file name")
    sim = Simulation.from_run_dir(ns.run_dir, device=ns.device)
    _check_client(ns, sim)
    sim.config.eval_samples = ns.eval_samples
    sim.setup()  # the run's data and test set; the restored state is kept
    models: list[tuple[str, object, dict]] = []  # (name, state, extra fields)

    st = sim.model_state(ns.client)
    models.append(("global" if ns.client is None else f"client {ns.client}", st, {"rank": st.rank}))
    if ns.by_rank:
        # grouped by the rank each client is sent now (the strategy's reading of its device rank)
        groups: dict[int, list[int]] = {}
        for c in range(sim.config.num_clients):
            groups.setdefault(int(sim.adapter_of(c)[2]), []).append(c)
        for r in sorted(groups):
            st = sim.model_state(groups[r][0])
            models.append((f"rank {r}", st, {"rank": st.rank, "clients": groups[r]}))
    n = len(sim.data.test)
    rows, scored = [], []  # scored: (state, accuracy, loss) of the models scored so far
    for who, st, extra in models:
        again = next((x for x in scored if _same_model(x[0], st)), None)
        if again is None:
            print(f"scoring the {who} model of {ns.run_dir} on {n} test documents ...", file=sys.stderr, flush=True)
            acc, loss = evaluate(sim.fm, st, sim.data.test, batch_size=ns.batch_size)
            scored.append((st, acc, loss))
        else:
            acc, loss = again[1], again[2]
        out = {"run": str(ns.run_dir), "model": who, **extra, "test_documents": n, "accuracy": acc, "loss": loss}
        if sim.fm.causal:
            out["perplexity"] = math.exp(loss) if loss < 700 else math.inf
        rows.append(out)
        shown = {k: v for k, v in out.items() if k not in ("run", "model", "clients")
                 and not (k == "rank" and who.startswith("rank "))}
        words = [f"{k} {100 * v:.2f}%" if k == "accuracy" else f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in shown.items()]
        print(f"{who}: " + "  ".join(words))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1) + "\n")
    return 0


def _plot(ns: argparse.Namespace) -> int:
    from hetlora.fl.report import plot_runs

    if ns.out and Path(ns.out).exists() and not Path(ns.out).is_dir():
        raise ValueError(f"--out: {ns.out!r} exists and is not a directory")

    for p in plot_runs(ns.run_dirs, ns.out):
        print(f"wrote {p}")
    return 0


def _bench(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    if importlib.util.find_spec("bench") is None:
        # an editable install: bench/ sits beside the package in the checkout
        root = Path(__file__).resolve().parent.parent
        if not (root / "bench" / "__main__.py").exists():
            print(
                "hetlora bench: the benchmark package `bench` is not importable here; run it from the "
                "repository root (python -m bench) where bench/ lives.",
                file=sys.stderr,
            )
            return 2
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    args = [a for a in ns.args if a != "--"]
    return subprocess.call([sys.executable, "-m", "bench", *args], env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hetlora`` console script; returns the exit status."""
    p = build_parser()
    ns, extra = p.parse_known_args(list(argv) if argv is not None else None)
    if extra and ns.command == "predict" and not any(a.startswith("-") for a in extra):
        ns.texts = [*ns.texts, *extra]  # texts after an option (`predict DIR --top 3 "text"`)
    elif extra:  # the subcommand's own usage, and only what looks like an option when texts may follow
        shown = [a for a in extra if a.startswith("-")] if ns.command == "predict" else extra
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[ns.command].error(f"unrecognized arguments: {' '.join(shown)}")
    try:
        if ns.command == "simulate":
            return _simulate(ns)
        if ns.command == "reproduce":
            return _reproduce(ns)
        if ns.command == "export":
            return _export(ns)
        if ns.command == "plot":
            return _plot(ns)
        if ns.command == "predict":
            return _predict(ns)
        if ns.command == "evaluate":
            return _evaluate(ns)
        return _bench(ns)
    except BrokenPipeError:  # `hetlora predict ... | head`: the reader has what it wanted
        sys.stderr.close()
        return 0
    except (ValueError, OSError) as e:  # a user's input or a path: one line, no traceback
        print(f"hetlora {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
