"""Triton launches without Triton's per-call Python work (``FAST_LAUNCH``, on by default;
``HETLORA_TRITON_FAST_LAUNCH=0`` turns it off).

The GPU lends found the triton LoRA calls host-bound: on the H100's host a forward+backward
took ~1.1 ms of host time against ~0.4 ms of kernel time, and most of it was Triton's launch
path in Python (the autotuner's key, the binder's specialisation of every argument, the
options string of the cache key), ~15-25 µs per launch on the 2-core CPU machine where a
torch op costs ~3 µs, so ~50-70 µs where a torch op costs ~6.5 µs.

`launch(kernel, grid)` caches, per kernel, the compiled kernel Triton chose for one call under
a key that fixes everything Triton's choice depends on and more: the current device, each
tensor argument's dtype and 16-byte alignment, every other argument's exact value (ints,
bools, strings, constexprs; floats by type only, as Triton types them ``fp32`` without
specialising on the value).  Triton specialises on less (an int on ``== 1`` and divisibility
by 16, a pointer on alignment), so one key never maps to two different compiled kernels: a
stricter key only misses more often, and a miss takes Triton's own path (which autotunes,
compiles and launches as usual) and records the kernel it ran.  A hit calls the compiled
kernel's launcher directly with the arguments in signature order, as ``JITFunction.run``
does.

Not taken (Triton's own path instead): under the interpreter, when a launch hook is set
(profilers such as proton read launch metadata), for objects that are not Triton kernels
(test spies), and for kernels with autotuner hooks.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from ..dispatch import kernel_configs_pinned
from .schedule import INTERPRET

FAST_LAUNCH = os.environ.get("HETLORA_TRITON_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")
"""On by default since the fourth H100 lend (2026-11-26): every GPU test passed through it (the one
failure was a test counting launches at ``kernel.run``, which this path skips).  What it saves is
launch overhead: an autotuned empty launch took 66 µs of host time through Triton's path and 32 µs
through this one on that lend's host.  The lends' profile rows timed it with the forward's
launches alone (the switch did not hold through the backward): a forward+backward took 1.09 ms
against 1.7 (fourth lend) and 1.27 against 1.40 (third), bf16, T = d = 4096, K = 64."""

_MAX_KEYS = 4096  # per kernel; a key holds no tensors (only dtypes, alignments and numbers)

STATS = {"hits": 0, "misses": 0, "fallbacks": 0}
"""Launches through the fast path since import: hits (the cached launcher), misses (Triton's
path, then cached), fallbacks (Triton's path for good: a hook set, an unhashable argument, a
kernel with a config pre-hook).  `bench profile` reports them beside its fast-launch rows."""


def _key(device: int, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """Two entries per argument, the first naming its kind: a tensor's dtype and whether its
    address is 16-byte aligned; a float's type alone; anything else its type and value (an
    unhashable value makes the tuple unhashable: the caller takes Triton's own path)."""
    key: list[Any] = [device]
    for v in args:
        if isinstance(v, torch.Tensor):
            key += (v.dtype, v.data_ptr() % 16 == 0)
        elif type(v) is float:
            key += (float, None)
        else:
            key += (type(v), v)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            key += (k, v.dtype, v.data_ptr() % 16 == 0)
        elif type(v) is float:
            key += (k, float, None)
        else:
            key += (k, type(v), v)
    return tuple(key)


class _Entry:
    """What a hit needs: the compiled kernel, and the arguments after the positional ones in
    signature order (constexprs from the call, the tuned config's block sizes, defaults),
    fixed by the key unless one of them is a float or tensor keyword (then built per call)."""

    __slots__ = ("compiled", "extra", "tail")

    def __init__(self, compiled: Any, extra: dict[str, Any], tail: list | None) -> None:
        self.compiled, self.extra, self.tail = compiled, extra, tail


class _Launcher:
    """The fast path of one kernel (an ``Autotuner`` or a ``JITFunction``)."""

    def __init__(self, kernel: Any) -> None:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        if isinstance(kernel, Autotuner) and isinstance(kernel.fn, JITFunction):
            tuner, jit = kernel, kernel.fn
        elif isinstance(kernel, JITFunction):
            tuner, jit = None, kernel
        else:  # another wrapper (heuristics, nested tuners) computes arguments per call
            raise AttributeError(f"no fast path for {type(kernel).__name__}")
        self.names = list(jit.arg_names)
        self.defaults = {p.name: p.default for p in jit.params if p.default is not inspect.Parameter.empty}
        # a config's pre_hook runs before each launch (Triton's path runs it); a Triton without
        # `triton.knobs` (before 3.4) keeps its launch hooks elsewhere: Triton's path, always
        self.usable = (tuner is None or all(getattr(c, "pre_hook", None) is None for c in tuner.configs)) \
            and _knobs() is not None
        self.tuner = tuner
        self.cache: dict[tuple, _Entry] = {}

    def __call__(self, grid: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        from triton.runtime.driver import driver

        knobs = _knobs()
        if not self.usable or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            return self._triton_path(grid, args, kwargs)
        device = driver.active.get_current_device()
        try:
            key = _key(device, args, kwargs)
            hit = self.cache.get(key)
        except TypeError:  # an unhashable argument value: Triton's own path
            return self._triton_path(grid, args, kwargs)
        if hit is None:
            STATS["misses"] += 1
            compiled = self.kernel[grid](*args, **kwargs)  # autotunes, compiles and launches as usual
            if compiled is not None and hasattr(compiled, "packed_metadata") and len(self.cache) < _MAX_KEYS:
                self.cache[key] = self._entry(compiled, args, kwargs)
            return
        STATS["hits"] += 1
        if hit.tail is not None:
            bound = [*args, *hit.tail]
        else:
            bound = self._bound(args, kwargs, hit.extra)
        g = (*(grid(dict(zip(self.names, bound))) if callable(grid) else grid), 1, 1)
        compiled = hit.compiled
        run = compiled.run  # a property on recent Tritons: loads the module on first use
        try:
            run(g[0], g[1], g[2], driver.active.get_current_stream(device), compiled.function,
                compiled.packed_metadata, None, None, None, *bound)
        except TypeError as e:
            # a Triton whose C launcher takes other arguments (it checks them before launching
            # anything): this kernel takes Triton's own path from now on, and says so once
            import warnings

            self.usable = False
            STATS["hits"] -= 1
            warnings.warn(f"hetlora fast launch: {getattr(self.kernel, '__name__', 'a kernel')}'s compiled "
                          f"launcher rejected its arguments ({e}); it launches through Triton's own path from now "
                          f"on (HETLORA_TRITON_FAST_LAUNCH=0 turns the fast path off)", RuntimeWarning, stacklevel=3)
            self._triton_path(grid, args, kwargs)

    def _triton_path(self, grid: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """The launch through Triton's own path, counted as a fallback."""
        STATS["fallbacks"] += 1
        self.kernel[grid](*args, **kwargs)

    def _bound(self, args: tuple, kwargs: dict[str, Any], extra: dict[str, Any]) -> list:
        """Every argument in signature order, as Triton's binder lists them."""
        values = dict(self.defaults)
        values.update(zip(self.names, args))
        values.update(kwargs)
        values.update(extra)
        return [values[n] for n in self.names]

    def _entry(self, compiled: Any, args: tuple, kwargs: dict[str, Any]) -> _Entry:
        config = self.tuner.best_config if self.tuner is not None else None
        # the config's constexprs (block sizes), not its options (num_warps, ...)
        extra = {k: v for k, v in (config.all_kwargs() if config is not None else {}).items() if k in self.names}
        fixed = not any(isinstance(v, (float, torch.Tensor)) for v in kwargs.values())
        tail = self._bound(args, kwargs, extra)[len(args):] if fixed else None
        return _Entry(compiled, extra, tail)


@functools.cache
def _knobs() -> Any:
    """``triton.knobs`` (Triton >= 3.4), or None (looked up once: a failed import costs more
    than a launch)."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs


def _hooked(hook: Any) -> bool:
    """A launch hook is set: None on older Tritons, an empty ``HookChain`` on newer ones means none."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _first_config(kernel: Any, grid: Any) -> Callable[..., None]:
    """``kernel[grid]`` with an autotuned kernel's first config, as Triton launches a kernel that
    has one config (no timing, no cache); anything else as it is."""
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
        config = kernel.configs[0]
        if config.pre_hook is None:  # (none of ours has one; Triton's path runs it otherwise)
            fn, extra = kernel.fn, config.all_kwargs()
            return lambda *args, **kwargs: fn[grid](*args, **kwargs, **extra)
    return kernel[grid]


def launch(kernel: Any, grid: Any) -> Callable[..., None]:
    """``kernel[grid]``, through the cached fast path when ``FAST_LAUNCH`` is on; with every
    autotuned kernel's first config inside `hetlora_kernels.pinned_kernel_configs` (the fast
    path's cache is skipped there: its entries hold the configs the autotuner picked).

    Use as ``launch(_my_kernel, grid)(*args, **constexprs)``.
    """
    if INTERPRET:
        return kernel[grid]
    if kernel_configs_pinned():
        return _first_config(kernel, grid)
    if not FAST_LAUNCH:
        return kernel[grid]
    launcher = getattr(kernel, "_hetlora_launcher", None)
    if launcher is None:
        try:
            launcher = _Launcher(kernel)
        except AttributeError:  # not a Triton kernel (a test's spy): its own launch
            return kernel[grid]
        kernel._hetlora_launcher = launcher
    return lambda *args, **kwargs: launcher(grid, args, kwargs)
