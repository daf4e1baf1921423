"""Regenerate README.md's "Performance" section from the committed benchmark results.

Reads ``bench/results/<device>/kernels.json``, ``e2e.json`` and ``serve.json`` (files tracked by git;
with none tracked, or with ``--uncommitted``, whatever is on disk) and writes the
generated markdown between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` in
README.md.  Never edit that section by hand: rerun ``python -m bench report``.
Without the markers, the section is printed and the README is left alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import common as C
from bench.e2e import table_rows
from bench.kernels import BASELINES
from bench.serve import table_rows as serve_rows

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def tracked_results(root: Path) -> set[Path] | None:
    """Result files git tracks (None when git is unavailable)."""
    try:
        out = subprocess.run(["git", "ls-files", "bench/results"], cwd=root, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {(root / line).resolve() for line in out.stdout.splitlines() if line}


def load_results(root: Path, uncommitted: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """``{slug: {"kernels": json, "e2e": json}}`` and a note on which files were used."""
    results_dir = root / "bench" / "results"
    files = sorted(f for kind in ("kernels", "e2e", "serve") for f in results_dir.glob(f"*/{kind}.json"))
    note = ""
    if not uncommitted:
        tracked = tracked_results(root)
        committed = [f for f in files if tracked is not None and f.resolve() in tracked]
        if committed:
            files = committed
        elif files:
            note = "(no committed results yet: generated from uncommitted files on disk)"
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"[bench report] skipping {f}: {e}", file=sys.stderr)
            continue
        out.setdefault(f.parent.name, {})[data.get("kind", f.stem)] = data
    return out, note


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms")]
    return min(ok, key=lambda r: r["median_ms"]) if ok else None


def kernels_summary(res: dict[str, Any]) -> str:
    rows = [r for r in res["rows"] if r.get("status") == "ok"]
    backends = res.get("backends", [])
    lora = [r for r in rows if r["op"] == "lora_linear" and r["mode"] == "fwd+bwd" and r.get("T")
            and r.get("arrangement", "grouped") == "grouped"]
    parts = []
    if lora:
        d = max(r["d_in"] for r in lora)
        dt = lora[0]["dtype"]
        mix = "mixed" if any(r["mix"] == "mixed" for r in lora) else lora[0]["mix"]
        sel = [r for r in lora if r["d_in"] == d and r["dtype"] == dt and r["mix"] == mix]
        body = []
        for T in sorted({r["T"] for r in sel}):
            for K in sorted({r["K"] for r in sel if r["T"] == T}):
                best = _best([r for r in sel if r["T"] == T and r["K"] == K and r["method"] in backends])
                if not best:
                    continue
                sp = best.get("speedup") or {}
                body.append([T, K, best["method"], C.fmt(best["median_ms"]),
                             *(C.fmt(sp.get(b), ".2f") for b in BASELINES),
                             C.fmt(100 * best["roofline_frac"], ".2g") if best.get("roofline_frac") else "–"])
        parts.append(f"`lora_linear` forward+backward (base + mixed-rank LoRA, d_in = d_out = {d}, {dt}, "
                     f"{mix} ranks), fastest backend per shape; `×B` = speed-up over baseline B:\n")
        parts.append(C.md_table(["T", "K", "backend", "ms", *(f"×{b}" for b in BASELINES), "% roofline"], body))
    vs = vs_torch_table(rows, backends)
    if vs:
        parts.append("\n" + vs)
    srv = [r for r in rows if r["op"] in ("component_norms", "delta_fro_norms", "weighted_aggregate", "truncate")]
    if srv:
        # the most clients, then the most layers per call (a whole model's adapters), then the widest
        top = max(srv, key=lambda r: (r["K"], r.get("L") or 1, r["d_in"]))
        key = (top["K"], top["d_in"], top.get("L"), top["dtype"])
        body = []
        for op in ("component_norms", "delta_fro_norms", "weighted_aggregate", "truncate"):
            best = _best([r for r in srv if r["op"] == op and (r["K"], r["d_in"], r.get("L"), r["dtype"]) == key
                          and r["method"] in backends])
            if best:
                sp = best.get("speedup") or {}
                body.append([op, best["method"], C.fmt(best["median_ms"]), C.fmt(sp.get("loop"), ".2f"),
                             C.fmt(sp.get("bmm_padded"), ".2f")])
        parts.append(f"\nServer ops, K = {key[0]} adapters, d = {key[1]}, L = {key[2]} layer(s) per call, {key[3]}:\n")
        parts.append(C.md_table(["op", "backend", "ms", "×loop", "×bmm_padded"], body))
    return "\n".join(parts)


def vs_torch_table(rows: list[dict[str, Any]], backends: list[str]) -> str:
    """Each other backend over the torch backend (median / median) for ``lora_delta``, K > 1,
    both token arrangements: the ratio the csrc issue asks to record."""
    others = [b for b in backends if b != "torch"]
    sel = [r for r in rows if r["op"] == "lora_delta" and r.get("T") and r["K"] > 1 and r["method"] in others
           and r.get("vs_torch")]
    if not sel:
        return ""
    d = max(r["d_in"] for r in sel)
    dt = sel[0]["dtype"]
    mix = "mixed" if any(r["mix"] == "mixed" for r in sel) else sel[0]["mix"]
    sel = [r for r in sel if r["d_in"] == d and r["dtype"] == dt and r["mix"] == mix]
    by = {(r["T"], r["K"], r.get("arrangement", "grouped"), r["mode"], r["method"]): r["vs_torch"] for r in sel}
    keys = sorted({k[:3] for k in by}, key=lambda k: (k[2] != "grouped", k[0], k[1]))
    cols = [(m, mode) for m in others for mode in ("fwd", "fwd+bwd") if any(k[3:] == (mode, m) for k in by)]
    body = [[T, K, arr, *(C.fmt(by.get((T, K, arr, mode, m)), ".2f") for m, mode in cols)] for T, K, arr in keys]
    head = (f"`lora_delta` on each other backend over the torch backend (`×torch` = torch's median / this "
            f"median; d = {d}, {dt}, {mix} ranks). `grouped`: each adapter's tokens contiguous; "
            f"`interleaved`: tokens in random adapter order:\n")
    return head + "\n" + C.md_table(["T", "K", "tokens", *(f"{m} {mode}" for m, mode in cols)], body)


def earlier_runs(root: Path) -> dict[str, list[str]]:
    """``{slug: [subfolder, ...]}``: earlier runs kept inside a device's folder (a lend's results
    moved aside when the next lend's replaced them), those holding a result table."""
    out: dict[str, list[str]] = {}
    for d in sorted((root / "bench" / "results").glob("*/*/")):
        if any((d / f"{kind}.md").exists() for kind in ("e2e", "kernels", "serve")):
            out.setdefault(d.parent.name, []).append(d.name)
    return out


def section(results: dict[str, dict[str, Any]], note: str, earlier: dict[str, list[str]] | None = None) -> str:
    """The generated markdown (no markers); ``earlier``: `earlier_runs`, linked under each device."""
    lines = ["_Generated by `python -m bench report` from `bench/results/`; do not edit by hand._"]
    if note:
        lines.append(f"_{note}_")
    if not results:
        lines.append("\nNo benchmark results yet: run `python -m bench kernels` and `python -m bench e2e` "
                     "(or `bench/gpu_all.sh` on a GPU), commit `bench/results/`, then `python -m bench report`.")
        return "\n".join(lines) + "\n"
    # GPUs first, then CPUs
    for slug in sorted(results, key=lambda s: (s.startswith("cpu"), s)):
        group = results[slug]
        any_res = group.get("e2e") or group.get("kernels") or group.get("serve")
        info = any_res["machine"]
        threads = "" if info.get("gpu") else f", {info.get('torch_threads')} torch thread(s)"
        lines.append(f"\n### {info['device_name']}{threads}\n")
        if earlier and earlier.get(slug):
            runs = ", ".join(f"[`{d}/`](bench/results/{slug}/{d}/)" for d in earlier[slug])
            lines.append(f"Other runs on this device, kept beside these (earlier lends, other settings): {runs}.\n")
        for kind in ("e2e", "serve", "kernels"):
            res = group.get(kind)
            if not res:
                continue
            m = res["machine"]
            load = m.get("loadavg_start")
            title = {"e2e": "End-to-end local training", "serve": "Serving many adapters (generation)",
                     "kernels": "Kernels"}[kind]
            # a folder is named for the kind of machine: another one of that kind may have run this
            where = f" on {m['device_name']}" if m.get("device_name") != info.get("device_name") else ""
            lines.append(f"**{title}** — measured{where} "
                         f"{m['date'][:16].replace('T', ' ')} UTC, commit `{m['git_commit']}`, preset "
                         f"`{res.get('preset')}`, torch {m['torch']}"
                         + (f", load average {load[0]:.2f}" if load else "")
                         + (", truncated by its time budget" if res.get("truncated") else "")
                         + f". Full table: [`bench/results/{slug}/{kind}.md`](bench/results/{slug}/{kind}.md).\n")
            if kind == "e2e":
                lines.append(C.md_table(*table_rows(res)))
                if res.get("memory_note"):  # what "peak MiB" means where it is not the allocator's peak
                    lines.append(f"\n{res['memory_note'][0].upper()}{res['memory_note'][1:]}.")
                if any(r.get("aten_ops_per_step") is not None for r in res["rows"]):
                    lines.append("\nOps/step: ATen ops one step dispatches (views left out; Triton and extension "
                                 "kernels not counted), the host's work per step whatever the machine.")
                lines.append("")
            elif kind == "serve":
                lines.append(C.md_table(*serve_rows(res)))
                lines.append(f"\n{res['method_note']}.\n")
            else:
                lines.append(kernels_summary(res))
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def splice(readme: str, body: str) -> str | None:
    """README text with ``body`` between the markers; None if the markers are missing."""
    i, j = readme.find(START), readme.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return readme[: i + len(START)] + "\n" + body + readme[j:]


def run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve() if args.root else C.REPO
    results, note = load_results(root, args.uncommitted)
    body = section(results, note, earlier_runs(root))
    readme_path = root / "README.md"
    readme = readme_path.read_text() if readme_path.exists() else ""
    new = splice(readme, body)
    if args.print:
        print(body)
        return 0
    if new is None:
        print(f"[bench report] README.md has no {START} ... {END} markers: not written. The section:\n")
        print(body)
        return 0
    if args.check:
        if new != readme:
            print("[bench report] README.md's Performance section is out of date: run `python -m bench report`")
            return 1
        print("[bench report] README.md is up to date")
        return 0
    if new != readme:
        readme_path.write_text(new)
        print(f"[bench report] wrote the Performance section of {readme_path} ({len(results)} device(s))")
    else:
        print("[bench report] README.md already up to date")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date; write nothing")
    p.add_argument("--print", action="store_true", help="print the section; write nothing")
    p.add_argument("--uncommitted", action="store_true", help="use result files even if git does not track them")
    p.add_argument("--root", help="repository root (default: this checkout)")
