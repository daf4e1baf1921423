"""Where one LoRA call's time goes: host (Python, checks, launches) against device (kernels).

The first GPU sweep (bench/results/nvidia-h200/) measured the triton ``lora_delta`` forward at
~0.2 ms and forward+backward at ~1.1-1.5 ms whatever T and K, while the kernels move a few MB:
the calls look host-bound.  ``python -m bench profile`` splits each method's time three ways at
one shape, so that the next GPU session knows what to cut:

* ``synced ms``: one call between two CUDA events, then a sync (what ``bench kernels`` reports);
* ``host ms``: the host's time per call when ``--calls`` calls are queued back to back with no
  sync (what Python, the checks and the launches cost; a hidden sync shows up here too);
* ``device ms``: the summed CUDA kernel time of one call, from ``torch.profiler``;

plus, per method, the profiler's table of the top host-side operations (``profile_<op>_<mode>_<method>.txt``).
On a CPU only the host column means anything (there is no device); it still runs, to check
the script.  Output: ``profile.json`` and ``profile.md`` under ``--out`` (default
``bench/results/<device>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

try:  # for the calibration kernels (see calibration_kernels)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = tl = None

from bench import common as C
from bench import kernels as KB


def _call(fn, case, mode: str):
    """One call of ``fn`` on ``case`` (with its backward in ``fwd+bwd``), under the path switches
    `_with` attached to ``fn``: the backward reads its switches when it runs, so they must hold
    through it (until session 13 they were set around the forward alone, and the pair-wgrad and
    fused-bwd rows of three lends timed the default backward)."""
    switches = getattr(fn, "switches", ())
    if mode == "fwd":
        def call() -> None:
            with torch.no_grad(), _switched(switches):
                fn(case)
    else:
        def call() -> None:
            with _switched(switches):
                fn(case).backward(case.dy)
    return call


@contextlib.contextmanager
def _switched(switches):
    old = [getattr(m, a) for m, a, _ in switches]
    for m, a, v in switches:
        setattr(m, a, v)
    try:
        yield
    finally:
        for (m, a, _), o in zip(switches, old):
            setattr(m, a, o)


def _clear(case) -> None:
    for t in case.leaves():
        t.grad = None


def _host_us(f, device: torch.device, n: int, warmup: int = 0) -> float:
    """Host microseconds per call of ``f`` with ``n`` calls queued back to back (no sync between)."""
    for _ in range(warmup):
        f()
    C.sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    dt = time.perf_counter() - t0
    C.sync(device)
    return dt / n * 1e6


def _host_ms(call, case, mode: str, device: torch.device, n: int) -> float:
    """Host time per call with ``n`` calls queued and no sync between them."""

    def step() -> None:
        if mode != "fwd":
            _clear(case)
        call()

    return _host_us(step, device, n) / 1e3


def _profile(call, case, mode: str, device: torch.device, n: int, top: int) -> tuple[float | None, str]:
    """(device ms per call, the top host-side ops table) from ``n`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            if mode != "fwd":
                _clear(case)
            call()
        C.sync(device)
    events = prof.key_averages()
    dev_ms = None
    if device.type == "cuda":
        # kernels and memcpys/memsets, each once (until session 13 the sum also took the CPU ops'
        # share of their kernels: up to 2x for rows of ATen ops; Triton's launches have no op)
        dev_ms = C.device_time_us(events) / n / 1e3
    table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    return dev_ms, table


def _python_profile(call, case, mode: str, device: torch.device, n: int, top: int) -> str:
    """The top ``top`` Python functions by own time over ``n`` calls (cProfile): which lines of
    ours, Triton's launcher or autograd's glue the host time of a call goes to, which
    torch.profiler's op table cannot say (it books all of it to the autograd node)."""
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    try:
        for _ in range(n):
            if mode != "fwd":
                _clear(case)
            call()
    finally:
        pr.disable()
    C.sync(device)
    buf = io.StringIO()
    print(f"{n} calls; times are totals over them (cProfile's own overhead inflates them ~2x)", file=buf)
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


@functools.cache
def calibration_kernels():
    """An empty Triton kernel with 12 arguments, bare and behind a two-config autotuner.

    Defined here, not inside `calibrate`: Triton resolves a kernel's names (``tl.constexpr`` in
    its signature) in the module's globals, and a ``tl`` imported inside a function is not there
    (the H100 lend's calibration failed with "CompilationError: at 1:49")."""
    @triton.jit
    def _noop(a, b, c, d, e, f, i, j, k, l, m, q, N: tl.constexpr):  # noqa: E741
        pass

    tuned = triton.autotune(configs=[triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)], key=["q"])(_noop)
    return _noop, tuned


def calibrate(device: torch.device, n: int = 200) -> dict[str, float | str]:
    """Host microseconds per call of the smallest things a LoRA call is made of, on this machine:
    a trivial torch op, an empty Triton kernel with 12 arguments, and the same behind a
    two-config autotuner (Triton keeps the tuned config: what a tuned launch costs)."""
    out: dict[str, float | str] = {}
    t = torch.zeros(16, device=device)

    def per_call(f) -> float:
        return _host_us(f, device, n, warmup=5)

    out["torch_add_us"] = per_call(lambda: t.add_(1.0))
    if device.type != "cuda":
        out["triton"] = "not timed: no GPU (the interpreter's launches say nothing about a GPU's)"
        return out
    try:
        from hetlora_kernels.triton import launch

        noop, tuned = calibration_kernels()
        args = (t, t, t, t, t, t, 1, 2, 3, 4, 5, 6)
        out["triton_launch_us"] = per_call(lambda: noop[(1,)](*args, N=16))
        out["triton_autotuned_launch_us"] = per_call(lambda: tuned[(1,)](*args, N=16))
        old, launch.FAST_LAUNCH = launch.FAST_LAUNCH, True
        try:
            out["triton_fast_launch_us"] = per_call(lambda: launch.launch(tuned, (1,))(*args, N=16))
        finally:
            launch.FAST_LAUNCH = old
    except Exception as e:  # noqa: BLE001 - calibration is a side measurement
        out["triton"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return out


def python_overhead(K: int, calls: int = 200) -> dict[str, float]:
    """Our own host time per triton call with every kernel launch replaced by a no-op.

    Runs anywhere (CPU tensors, no GPU, no interpreter): what ``check_*``, the schedule caches,
    allocations and the autograd glue cost, apart from Triton's launcher and the kernels.  Tiny
    widths (d = 16) keep the CPU-side arithmetic of autograd's gradient accumulation out of it.
    The triton modules' kernels are restored afterwards.
    """
    import hetlora_kernels as hk
    from hetlora_kernels import checks
    from hetlora_kernels.triton import expand, fused, lora, shrink, wgrad

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    stubs = [(m, n, _NoLaunch()) for m in (shrink, expand, fused, wgrad) for n in dir(m) if n.endswith("_kernel")]
    with _switched(stubs):
        d, n_per = 16, 4
        ranks = KB.make_ranks(K, "mixed")
        layout = hk.AdapterLayout(ranks)
        ids = torch.arange(K).repeat_interleave(n_per)
        groups = hk.TokenGroups.from_adapter_ids(ids, K)
        x = torch.randn(len(ids), d, requires_grad=True)
        A = torch.randn(layout.total_rank, d, requires_grad=True)
        B = torch.randn(layout.total_rank, d, requires_grad=True)
        dy = torch.randn(len(ids), d)
        scales = [KB.ALPHA / r for r in ranks]

        def fwd():
            s = checks.check_lora_inputs(x, A, B, layout, groups, scales)
            return lora.lora_delta_impl(x, A, B, layout, groups, s)

        def fwd_bwd():
            x.grad = A.grad = B.grad = None
            fwd().backward(dy)

        cpu = torch.device("cpu")
        return {name: _host_us(f, cpu, calls, warmup=10) for name, f in (("fwd_us", fwd), ("fwd+bwd_us", fwd_bwd))}


def _with(fn, *switches: tuple[Any, str, Any]):
    """``fn`` with each ``(module, attr, value)`` switch (a triton path choice) attached: `_call`
    sets them around the whole call, backward included, and restores them after."""

    def f(c):
        return fn(c)

    f.switches = switches
    return f


def run(args: argparse.Namespace) -> Path | None:
    if args.python_overhead:
        for K in (8, 64, 256):
            r = python_overhead(K)
            print(f"[bench profile] our Python per triton call, launches stubbed out, K={K}: "
                  f"fwd {r['fwd_us']:.1f} us, fwd+bwd {r['fwd+bwd_us']:.1f} us", flush=True)
        return None
    for name, low in (("K", 1), ("d", 1), ("calls", 1), ("top", 1)):
        if getattr(args, name) < low:
            raise SystemExit(f"bench profile: --{name} must be >= {low}, got {getattr(args, name)}")
    if args.T < args.K:
        raise SystemExit(f"bench profile: --T must be >= --K (one token per adapter at least), got T={args.T}, "
                         f"K={args.K}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench profile: --device cuda was asked for but this torch sees no CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = C.out_dir(args.out, device)
    out.mkdir(parents=True, exist_ok=True)
    import hetlora_kernels as hk

    backends = [b for b in ("triton", "cuda", "torch") if hk.backend_status(b, device)[0]]
    T, d, K = args.T - args.T % args.K, args.d, args.K
    ranks = KB.make_ranks(K, "mixed")
    layout = hk.AdapterLayout(ranks)
    n_per = T // K
    r_pad = -(-layout.max_rank // 8) * 8
    ids, perm = KB.token_ids(K, n_per, "grouped", device)
    groups = hk.TokenGroups.from_adapter_ids(ids, K)
    gen = torch.Generator(device=device).manual_seed(0)
    case = KB.make_case(T, d, d, layout, r_pad, dtype, device, gen)
    scales = [KB.ALPHA / r for r in ranks]
    info = C.machine_info(device)
    res: dict[str, Any] = {"kind": "profile", "machine": info, "T": T, "d": d, "K": K, "dtype": args.dtype,
                           "calls": args.calls, "rows": [], "calibration": calibrate(device)}
    print(f"[bench profile] {info['device_name']}: T={T} d={d} K={K} {args.dtype}, backends {backends}", flush=True)
    print(f"  calibration (host us per call): {res['calibration']}", flush=True)
    for op in KB.LORA_OPS:
        methods = KB.lora_methods(op, layout, groups, n_per, scales, backends, None if hasattr(torch, "_grouped_mm")
                                  else "no torch._grouped_mm", None, "not profiled", min(64, n_per), device, dtype,
                                  perm)
        if "triton" in methods and not isinstance(methods["triton"], str):
            # right after the default (a stage cut by its timeout keeps the rows that matter): the
            # default through Triton's own launch path, what the cached one (launch.FAST_LAUNCH,
            # the default since the fourth lend) saves; then the backward's two opt-in paths
            # (fwd+bwd rows only), which no lend has timed yet: until session 13 a switch held
            # during the forward alone.  The H100 lends (bench/NOTES.md) retired the forward's
            # `2-launch`, `fewest` and `fused` (6x the device time at this shape)
            from hetlora_kernels.triton import launch, lora

            t = methods.pop("triton")
            methods = {"triton": _with(t, (launch, "FAST_LAUNCH", True)),
                       "triton[triton-launch]": _with(t, (launch, "FAST_LAUNCH", False)),
                       "triton[pair-wgrad]": _with(t, (lora, "PAIR_WGRAD", True)),
                       "triton[fused-bwd]": _with(t, (lora, "FUSED_BACKWARD", True)), **methods}
        for mode in ("fwd", "fwd+bwd"):
            for name, fn in methods.items():
                if isinstance(fn, str) or name in ("peft", "loop") and K > 64:
                    continue
                if mode == "fwd" and name in ("triton[pair-wgrad]", "triton[fused-bwd]"):
                    continue  # backward switches: the forward is the default's
                row: dict[str, Any] = {"op": op, "mode": mode, "method": name}
                fast0 = _fast_stats()
                try:
                    call = _call(fn, case, mode)
                    for _ in range(3):  # warm-up: compiles, autotunes, caches schedules
                        _clear(case)
                        call()
                    C.sync(device)
                    r = C.time_fn([call], device, warmup=1, reps=args.calls, before=lambda: _clear(case))
                    row["synced_ms"] = r["median_s"] * 1e3
                    row["host_ms"] = _host_ms(call, case, mode, device, args.calls)
                    row["device_ms"], table = _profile(call, case, mode, device, min(args.calls, 10), args.top)
                    tag = name.replace("[", "_").replace("]", "")
                    name_ = f"profile_{op}_{mode.replace('+', '_')}_{tag}.txt"
                    (out / name_).write_text(table)
                    row["table"] = name_
                    if name.startswith("triton"):
                        py = f"pyprof_{op}_{mode.replace('+', '_')}_{tag}.txt"
                        (out / py).write_text(_python_profile(call, case, mode, device, min(args.calls, 20), 30))
                        row["python_table"] = py
                    row["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - one method's failure is a row, not the end
                    row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if name == "triton":  # did its launches take the cached path?
                    row["fast_launch"] = {k: v - fast0[k] for k, v in _fast_stats().items()}
                res["rows"].append(row)
                _save(res, out)  # after every row: a stage killed by its timeout keeps what it measured
                print(f"  {op} {mode} {name}: synced {C.fmt(row.get('synced_ms'))} ms, host "
                      f"{C.fmt(row.get('host_ms'))} ms, device {C.fmt(row.get('device_ms'))} ms"
                      f"{' ' + row['reason'] if row.get('reason') else ''}", flush=True)
    C.finish_info(info)
    res["complete"] = True
    _save(res, out)
    print(f"[bench profile] wrote {out / 'profile.md'}", flush=True)
    return out


def _fast_stats() -> dict[str, int]:
    try:
        from hetlora_kernels.triton import launch
    except ImportError:  # no triton: no fast path either
        return {"hits": 0, "misses": 0, "fallbacks": 0}
    return dict(launch.STATS)


def _save(res: dict[str, Any], out: Path) -> None:
    (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "profile.md").write_text(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Where a LoRA call's time goes",
        "",
        f"Device: **{m.get('device_name')}** · {m.get('date')} · commit `{m.get('git_commit')}` · "
        f"T = {res['T']}, d_in = d_out = {res['d']}, K = {res['K']} (mixed ranks, grouped tokens), {res['dtype']}.",
        "",
        "`synced` = one call between CUDA events (as `bench kernels`); `host` = host time per call with "
        f"{res['calls']} calls queued, no sync; `device` = summed kernel time of one call (torch.profiler). "
        "host ≥ device means the call is host-bound."
        + ("" if res.get("complete") else " **Partial: the run was cut short.**"),
        "",
        "Calibration, host µs per call: " + ", ".join(f"{k} {C.fmt(v) if not isinstance(v, str) else v}"
                                                      for k, v in res.get("calibration", {}).items()) + ".",
        "",
        "| op | mode | method | synced ms | host ms | device ms | host-side ops | Python functions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fl = r.get("fast_launch")
        method = r["method"] + (f" (launches: {fl['hits']} cached, {fl['misses']} missed, {fl['fallbacks']} "
                                f"Triton's)" if fl else "")
        lines.append(f"| {r['op']} | {r['mode']} | {method} | {C.fmt(r.get('synced_ms'))} | "
                     f"{C.fmt(r.get('host_ms'))} | {C.fmt(r.get('device_ms'))} | "
                     f"{r.get('table') or r.get('reason', '')} | {r.get('python_table', '–')} |")
    return "\n".join(lines) + "\n"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda where torch sees a GPU, else cpu")
    p.add_argument("--T", type=int, default=4096, help="tokens (rounded down to a multiple of K; default 4096)")
    p.add_argument("--d", type=int, default=4096, help="d_in = d_out (default 4096)")
    p.add_argument("--K", type=int, default=64, help="adapters (default 64)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--calls", type=int, default=20, help="calls per measurement (default 20)")
    p.add_argument("--top", type=int, default=25, help="rows of each host-side ops table (default 25)")
    p.add_argument("--out", help="output folder (default bench/results/<device>/)")
    p.add_argument("--python-overhead", action="store_true",
                   help="only print our own host time per triton call with the launches stubbed out "
                        "(runs without a GPU; K = 8, 64, 256)")
