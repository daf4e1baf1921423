"""Shared machinery of the benchmarks: machine description, device peaks, timers, output.

Timing protocol (DESIGN.md section 6, ../.library/device/METHOD.md):

* GPU: CUDA events around each call, after warm-up calls; the call rotates over
  several input sets so that repeated calls do not just re-read L2; the median of
  the per-call times is reported (plus the 20th/80th percentiles).
* CPU: ``time.perf_counter`` around each call, warm-up first, median of the reps;
  ``torch.set_num_threads`` is left as torch sets it (recorded in the JSON), and the
  load average before and after the run is recorded because the machine is shared.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# Datasheet peaks, dense (no sparsity): bytes/s of device memory and flop/s of the
# matrix units per dtype.  float32 is the non-tensor-core rate (torch's default
# matmul precision keeps fp32 off TF32).  Matched against torch's device name.
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bw": 4.8e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "l2": 50e6}),
    ("H100 PCIe", {"bw": 2.0e12, "bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "l2": 50e6}),
    ("H100 NVL", {"bw": 3.9e12, "bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "l2": 50e6}),
    ("H100", {"bw": 3.35e12, "bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "l2": 50e6}),  # SXM (HBM3)
    ("A100-SXM4-80GB", {"bw": 2.039e12, "bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "l2": 40e6}),
    ("A100 80GB PCIe", {"bw": 1.935e12, "bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "l2": 40e6}),
    ("A100", {"bw": 1.555e12, "bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "l2": 40e6}),  # 40 GB
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dt: torch.dtype) -> str:
    return DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


# ------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_slug(device: torch.device | str) -> str:
    """Folder name for a device: ``cpu-2core`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to place a result: host, CPU, GPU, versions, date, commit."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": str(device),
        "device_slug": device_slug(device),
        "gpu": None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["gpu_memory_bytes"] = p.total_memory
        info["gpu_sm_count"] = p.multi_processor_count
        info["cuda"] = torch.version.cuda
        info["device_name"] = p.name
    else:
        info["device_name"] = f"{info['cpu']} ({os.cpu_count()} cores)"
    return info


def finish_info(info: dict[str, Any]) -> None:
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())


# ------------------------------------------------------------------------------------------
# peaks (roofline)
# ------------------------------------------------------------------------------------------
def table_peaks(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in name.lower():
            return dict(peaks)
    return None


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> dict[str, float]:
    """Measured memory bandwidth (a large copy: bytes read + written) and matmul rate per dtype,
    each from its fastest rep.

    Seconds of work on a GPU, about one second on a 2-core CPU (less with ``quick``).
    """
    out: dict[str, float] = {}
    gpu = device.type == "cuda"
    n = (1 << 28 if gpu else (1 << 22 if quick else 1 << 25))  # bytes / 4 per buffer
    bufs = [torch.randn(n // 4, device=device), torch.empty(n // 4, device=device)]
    # a ceiling is the best the machine did: the fastest rep, not the median
    t = time_fn([lambda: bufs[1].copy_(bufs[0])], device, warmup=2, reps=5 if quick else 10)["min_s"]
    out["bw"] = 2 * bufs[0].numel() * bufs[0].element_size() / t
    bufs.clear()
    for dt in dtypes:
        m = (8192 if gpu else (256 if quick else 1024))
        a = torch.randn(m, m, device=device).to(dt)
        b = torch.randn(m, m, device=device).to(dt)
        try:
            t = time_fn([lambda a=a, b=b: a @ b], device, warmup=2, reps=5 if quick else 10)["min_s"]
            out[dtype_name(dt)] = 2 * m**3 / t
        except RuntimeError:
            pass
    return out


def roofline_floor_s(nbytes: float, flops: float, dtype: torch.dtype, peaks: dict[str, float] | None) -> float | None:
    """``max(bytes / bandwidth, flops / matmul rate)``; None where the peaks are unknown."""
    if not peaks or "bw" not in peaks:
        return None
    rate = peaks.get(dtype_name(dtype))
    t_bw = nbytes / peaks["bw"]
    if rate is None:
        return t_bw
    return max(t_bw, flops / rate)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SLOW_REPS = 2  # samples of a slow call (`time_fn`'s ``slow_s``): its probe and one more


def time_fn(
    calls: Sequence[Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 3,
    reps: int = 20,
    min_reps: int = 1,
    budget_s: float | None = None,
    before: Callable[[], Any] | None = None,
    slow_s: float | None = None,
    peak: bool = False,
) -> dict[str, Any]:
    """Median time of one call; ``calls`` are the same work on different input sets (rotated).

    ``before`` runs before each call outside the timed region (e.g. clearing grads).
    With ``budget_s``, stops after at least ``min_reps`` reps once the budget is spent.
    With ``slow_s``: a call whose second warm-up run (the first may compile) takes longer than
    that is warmed up no further, and that run counts as the first of `SLOW_REPS` samples
    (a baseline 100x slower than the rest needs no more to be ranked, and would otherwise
    eat a sweep's budget).
    With ``peak`` on a GPU: ``peak_bytes``, the caching allocator's peak above what was
    allocated before the first timed call (`peak_memory` without a call of its own; None
    where no call was timed, or off the GPU).
    """
    gpu = device.type == "cuda"
    n = len(calls)
    times: list[float] = []

    def timed(f: Callable[[], Any], measure_peak: bool = False) -> int | None:
        if before:
            before()
        base = None
        if measure_peak:  # host-side bookkeeping of the allocator: no sync needed here
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        if gpu:
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            f()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return None if base is None else int(torch.cuda.max_memory_allocated(device) - base)

    for i in range(warmup):
        if slow_s is not None and i == 1:
            sync(device)  # the first call's work out of the way
            timed(calls[i % n])
            if times[-1] > slow_s:
                min_reps, reps = min(min_reps, SLOW_REPS), min(reps, SLOW_REPS)
                break
            times.clear()
            continue
        if before:
            before()
        calls[i % n]()
    sync(device)
    peak_bytes = None
    t_start = time.perf_counter()
    first = len(times)  # 1 where the slow probe already counts
    for i in range(first, reps):
        pb = timed(calls[i % n], measure_peak=peak and gpu and peak_bytes is None)
        if pb is not None:
            peak_bytes = pb
        if budget_s is not None and len(times) >= min_reps and time.perf_counter() - t_start > budget_s:
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "min_s": times[0], "p20_s": q[0], "p80_s": q[3],
            "reps": len(times), "peak_bytes": peak_bytes}


def device_events(events: Any) -> Any:
    """The device's own entries of a torch.profiler ``key_averages()`` list: kernels, memcpys and
    memsets, without the user annotations' device spans (an optimizer's ``record_function``)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList

    return EventList([e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False)])


def device_time_us(events: Any) -> float:
    """Device microseconds in a ``key_averages()`` list, every kernel, memcpy and memset once.

    Summing ``self_device_time_total`` over every entry counts an eager kernel twice: torch.profiler
    books it on its own entry and again on the CPU op that launched it (and adds an annotation's
    span), while a CUDA graph's replayed kernels, launched under no op, count once."""
    total = 0.0
    for e in device_events(events):
        v = getattr(e, "self_device_time_total", None)
        total += v if v is not None else getattr(e, "self_cuda_time_total", 0)
    return total


def aten_ops(fn: Callable[[], Any]) -> int:
    """ATen ops one call of ``fn`` dispatches, views left out: a count of the host's work that
    does not depend on the machine (on a GPU, roughly the kernel launches torch makes; Triton and
    extension kernels are launched outside ATen and not counted).  Backward ops are counted too
    (dispatch modes follow autograd into its worker threads)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not getattr(func, "is_view", False):
                self.n += 1
            return func(*args, **(kwargs or {}))

    with _Count() as c:
        fn()
    return c.n


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated *above what was allocated before* one call.

    GPU: the caching allocator's peak counter.  CPU: torch's CPU allocator keeps no counter,
    so the call runs once under the profiler with ``profile_memory=True`` and the peak is the
    largest running sum of its allocation (+) and free (-) events in time order; it counts
    what torch allocates (compiled ops' ``at::empty`` included), not a library's own scratch
    (MKL's packing buffers).  None where neither works.
    """
    if device.type == "cpu":
        return _cpu_peak_memory(fn)
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _cpu_peak_memory(fn: Callable[[], Any]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
    except (RuntimeError, AttributeError):  # another profiler active, or a torch without kineto
        return None
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return int(peak)


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------
def resolve_run(args) -> tuple[torch.device, str]:
    """``(device, preset name)`` of a ``kernels``/``e2e`` run from its shared flags (``--device``,
    ``--threads``, ``--smoke``, ``--preset``); sets torch's thread count when asked."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, "smoke" if args.smoke else (args.preset or ("gpu" if device.type == "cuda" else "cpu"))


def out_dir(out: str | None, device: torch.device) -> Path:
    p = Path(out) if out else RESULTS / device_slug(device)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_results(res: dict, out: Path, kind: str, markdown: Callable[[dict], str]) -> dict:
    """Write ``<kind>.json`` and ``<kind>.md`` under ``out`` from one cleaned copy of ``res``
    (called after every job too, so a run killed by an outer timeout leaves valid files);
    returns the cleaned copy."""
    cleaned = clean(res)
    write_json(out / f"{kind}.json", cleaned)
    (out / f"{kind}.md").write_text(markdown(cleaned))
    return cleaned


def write_json(path: Path, obj: Any) -> None:
    """Atomic write (temp + rename): a run killed mid-way leaves the last complete file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return dtype_name(o)
    if isinstance(o, (torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean(x: Any) -> Any:
    """Replace non-finite floats by None so that the JSON stays strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def header_md(info: dict[str, Any], title: str) -> str:
    load, end = info.get("loadavg_start"), info.get("loadavg_end")
    load_s = f", 1-min load average {load[0]:.2f} at start" if load else ""
    load_s += f", {end[0]:.2f} at end" if end else ""
    return (
        f"# {title}\n\n"
        f"Device: **{info['device_name']}** · {info['date']} · commit `{info['git_commit']}` · "
        f"torch {info['torch']}, triton {info['triton']}, peft {info['peft']} · "
        f"host `{info['hostname']}`, {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads{load_s}\n"
    )


def add_preset_args(p, presets, preset_help: str, smoke_help: str) -> None:
    """``--preset`` (one of ``presets``), ``--smoke`` and `add_run_args`'s flags."""
    p.add_argument("--preset", choices=sorted(presets), help=preset_help)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    add_run_args(p)


def add_run_args(p) -> None:
    """The flags every benchmark takes: where results go, which device, how many CPU threads."""
    p.add_argument("--out", help="output folder (default bench/results/<device-slug>/)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's own choice)")
