"""Backend selection: ``"auto" | "triton" | "cuda" | "torch"``.

A backend is a module exposing ``available(device) -> (bool, reason)`` and ``IMPLS``,
a dict from op name to an implementation that takes *validated* arguments (the
``prepare_*`` functions of `reference` validate once for every backend).  Backends
load lazily on first use so that importing hetlora_kernels never compiles anything.
An explicitly chosen backend that lacks an op raises; ``auto`` falls back per op.

``auto`` on CUDA tensors tries triton, then cuda, then torch, except where the GPU sweep measured
another order: some server ops, and a LoRA call with one adapter over grouped tokens
(`cuda_auto_order`).  On CPU tensors it picks, per op,
between the C++ ops of the ``cuda`` extension and the torch path by the table `cpu_auto_choice`
measured with ``python -m bench kernels`` (``bench/results/cpu-2core/``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import reference

BACKENDS = ("auto", "triton", "cuda", "torch")
# modules that provide each non-torch backend
_MODULES = {"triton": "hetlora_kernels.triton", "cuda": "hetlora_kernels.cuda"}
# the order "auto" tries on CUDA tensors, fastest first (CPU tensors: `cpu_auto_choice`)
_AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
# Per-op exceptions, from the first GPU sweep (bench/results/nvidia-h200/kernels.json, H200,
# 2026-11-26, fp32 server ops, K in {8, 64, 256}, d in {1024, 4096}, L in {1, 12}):
# - component_norms: the CUDA kernel fastest at 11 of 12 shapes (1.4-2.6x triton at L=12);
# - weighted_aggregate: CUDA fastest at 11 of 12 (up to 2.4x triton, 2.8x torch);
# - truncate (a row gather): torch's index_select at parity or faster where it matters
#   (L=12, d=4096: 0.49-1.35 ms against triton's 0.74-2.38);
# The second sweep (bench/results/nvidia-h100-80gb-hbm3/kernels.json, H100, 2026-11-26, d=4096,
# L in {1, 12}, K in {8, 64, 256}) kept those three and turned one:
# - delta_fro_norms: the CUDA Gram-tile kernel (rewritten since the H200 sweep, where the old one
#   took 3-14x triton's time) now fastest at all 6 shapes (1.1-2.2x triton: 0.12 vs 0.27 ms at
#   L=1, K=8; 8.4 vs 13.9 ms at L=12, K=256).
# The LoRA ops stay triton-first (but see `cuda_auto_order` for one adapter): the CUDA LoRA
# kernels take 10-40x triton's device time (no tensor cores).
_AUTO_ORDER_CUDA_BY_OP = {
    "component_norms": ("cuda", "triton", "torch"),
    "weighted_aggregate": ("cuda", "triton", "torch"),
    "delta_fro_norms": ("cuda", "triton", "torch"),
    "truncate": ("torch",),
}


def cuda_auto_order(op: str, work: LoraWork | None = None) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on CUDA tensors, in order (the first available runs).

    One adapter over grouped tokens (one matmul pair, no gather on the torch path): torch.  The
    H200 sweep measured the torch backend faster than triton there at 15 of 16 shapes (1.3-3.1x;
    the 16th, lora_linear at T = 16384, 0.94x), the H100 sweep at 12 of 16: both are host-bound,
    and torch launches fewer and cheaper kernels.
    """
    if op in ("lora_delta", "lora_linear") and work is not None and work.active <= 1 and work.grouped:
        return ("torch",)
    return _AUTO_ORDER_CUDA_BY_OP.get(op, _AUTO_ORDER_CUDA)

_current: contextvars.ContextVar[str] = contextvars.ContextVar("hetlora_backend", default="auto")
_loaded: dict[str, object] = {"torch": reference}
_load_errors: dict[str, str] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {name!r}")
    return name


def _module(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # ImportError, or a build failure inside the module
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return None
    _loaded[name] = mod
    return mod


def backend_status(name: str, device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device``, and why not."""
    _check_name(name)
    if name == "auto":
        return True, ""
    mod = _module(name)
    if mod is None:
        return False, f"the {name} backend failed to load ({_load_errors[name]})"
    if name == "torch":
        return True, ""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device here (torch.cuda.is_available() is False)"
    return mod.available(device)


def set_backend(name: str) -> None:
    """Choose the backend for every op in this context (thread / task)."""
    _current.set(_check_name(name))


def get_backend() -> str:
    """The backend name in force: ``"auto"`` unless one was set."""
    return _current.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("torch"): ...`` runs the block on that backend, then restores."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


_pinned = [0]  # depth of `pinned_kernel_configs` blocks (process-wide, like torch's deterministic mode)


@contextlib.contextmanager
def pinned_kernel_configs() -> Iterator[None]:
    """Inside the block every autotuned Triton kernel launches with its first config, the one
    ``HETLORA_TRITON_AUTOTUNE=0`` keeps, instead of the fastest this process timed.

    A config fixes block sizes, and so the order in which a kernel adds; the autotuner's pick can
    differ between processes when two configs time alike, and with it the last bits of a result.
    Pinned, a kernel's bits depend on its inputs' shapes alone (reproducible runs,
    ``hetlora.fl``'s ``FedConfig.deterministic``).  Slower where another config was faster.
    Nothing changes for the other backends, which have no configs.
    """
    _pinned[0] += 1
    try:
        yield
    finally:
        _pinned[0] -= 1


def kernel_configs_pinned() -> bool:
    """Whether a `pinned_kernel_configs` block is open."""
    return _pinned[0] > 0


@dataclass(frozen=True)
class LoraWork:
    """What ``auto`` needs to know of one ``lora_delta`` / ``lora_linear`` call (`cpu_auto_choice`,
    `cuda_auto_order`)."""

    routed: int  # tokens with an adapter
    active: int  # adapters that own at least one token
    grouped: bool  # tokens already contiguous per adapter, no -1 (the torch path skips its gather)
    dtype: torch.dtype


# "auto" on CPU tensors: where the C++ ops (backend "cuda") measured faster than the torch path.
# Source: bench/results/cpu-2core/ (1 thread) and cpu-2core-threads2/ (2 threads), kernels.json, fp32:
# three sweeps on the morning of 2026-11-26 for the LoRA ops and the first three server ops, the
# afternoon's (committed now; the LoRA ratios within the same ranges) for delta_fro_norms:
# - component_norms 1.1-1.9x, weighted_aggregate 1.3-2.0x: C++;  truncate 0.9-1.6x (noise around
#   parity): torch.
# - delta_fro_norms: C++ since its register-tiled Gram kernel (the sweeps of 2026-11-26 afternoon, fp32, K
#   adapters of ranks 4..64 at L=1 d=1024 K=8/64 and L=12 d=384 K=64): 3.3-4.3x the torch path on one
#   thread, 4.3-5.6x on two (the old kernel: 0.6-0.9x).
# - lora_delta / lora_linear: interleaved tokens 1.3-3.4x (the torch path gathers and scatters);
#   grouped tokens: 1.2-3.5x up to 32 tokens per adapter (one 0.9x row); 64-128 per adapter 1.0-1.6x with 2
#   threads but 0.8-1.0x with 1 thread; 0.5-0.9x with one adapter or 512 per adapter (one big
#   MKL GEMM pair per adapter is as fast as it gets).  float64: torch (the oracle dtype; not timed).
_CPU_CPP_OPS = frozenset({"component_norms", "weighted_aggregate", "delta_fro_norms"})
_CPU_CPP_MAX_PER_ADAPTER = {1: 32}  # tokens per adapter, by thread count (more threads: 128)


def cpu_auto_choice(op: str, work: LoraWork | None = None) -> str:
    """The backend ``auto`` prefers for ``op`` on CPU tensors: ``"cuda"`` (the C++ ops) or ``"torch"``."""
    if op in _CPU_CPP_OPS:
        return "cuda"
    if op not in ("lora_delta", "lora_linear") or work is None or work.dtype == torch.float64:
        return "torch"
    if work.active <= 1:
        return "torch"
    if not work.grouped:
        return "cuda"
    limit = _CPU_CPP_MAX_PER_ADAPTER.get(torch.get_num_threads(), 128)
    return "cuda" if work.routed <= limit * work.active else "torch"


def resolve(op: str, device: torch.device, work: LoraWork | None = None) -> tuple[str, object]:
    """The (backend name, implementation) that runs ``op`` on ``device`` now; ``work`` informs
    ``auto``'s choice on CPU tensors for the LoRA ops."""
    name = _current.get()
    if name == "auto":
        if device.type == "cuda":
            order = cuda_auto_order(op, work)
        elif device.type == "cpu":
            order = (cpu_auto_choice(op, work), "torch")
        else:
            order = ("torch",)
        for cand in order:
            mod = _module(cand)
            if mod is None or op not in mod.IMPLS:
                continue
            if cand == "torch" or mod.available(device)[0]:
                return cand, mod.IMPLS[op]
        return "torch", reference.IMPLS[op]
    ok, why = backend_status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {why}")
    mod = _module(name)
    if op not in mod.IMPLS:
        raise NotImplementedError(f"backend {name!r} has no {op}; use_backend('auto') or 'torch'")
    return name, mod.IMPLS[op]
