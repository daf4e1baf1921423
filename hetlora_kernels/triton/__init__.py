"""The ``triton`` backend: Triton kernels for the mixed-rank LoRA ops.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the test
suite's mode; the variable is read when the kernels are decorated, i.e. at import).
Each op module exports an ``IMPLS`` dict (op name -> implementation taking validated
arguments, as `hetlora_kernels.reference`'s ``*_impl`` do); this package merges them.
"""

from __future__ import annotations

import importlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

IMPLS: dict = {}
LOAD_ERRORS: dict[str, str] = {}
for _mod in ("lora", "server_ops"):
    try:
        IMPLS.update(importlib.import_module(f"{__name__}.{_mod}").IMPLS)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_mod}":
            LOAD_ERRORS[_mod] = f"{type(e).__name__}: {e}"
    except Exception as e:  # a kernel module that fails to import must not break the others
        LOAD_ERRORS[_mod] = f"{type(e).__name__}: {e}"


def available(device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and INTERPRET:
        return True, ""
    return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 set before import for CPU tensors)"
