"""Backend selection: ``"auto" | "triton" | "cuda" | "torch"``.

A backend is a module exposing ``available(device) -> (bool, reason)`` and ``IMPLS``,
a dict from op name to an implementation that takes *validated* arguments (the
``prepare_*`` functions of `reference` validate once for every backend).  Backends
load lazily on first use so that importing hetlora_kernels never compiles anything.
An explicitly chosen backend that lacks an op raises; ``auto`` falls back per op.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator

import torch

from . import reference

BACKENDS = ("auto", "triton", "cuda", "torch")
# modules that provide each non-torch backend
_MODULES = {"triton": "hetlora_kernels.triton", "cuda": "hetlora_kernels.cuda"}
# the order "auto" tries per device type, fastest first
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}

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
    return mod.available(torch.device(device))


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


def resolve(op: str, device: torch.device) -> tuple[str, object]:
    """The (backend name, implementation) that runs ``op`` on ``device`` now."""
    name = _current.get()
    if name == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
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
