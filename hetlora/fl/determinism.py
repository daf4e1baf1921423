"""Bitwise-reproducible GPU runs (``FedConfig.deterministic``).

On a GPU a few of torch's ops add in whatever order their threads finish (atomics): the
per-client loss sums and clipping norms (``index_add``), the classifier heads' gradient
(``index_put`` with ``accumulate=True``, the backward of ``head_W[aid]``), attention's backward.
Two runs of one configuration then agree only to rounding.  torch's deterministic mode swaps
those for deterministic kernels (and raises on an op that has none); cuBLAS needs a fixed
workspace for the same.  The Triton kernels of `hetlora_kernels` use no atomics, but the
autotuner's pick of block sizes (and so of the order of a kernel's sums) may differ from one
process to the next: they run with their first config (`hetlora_kernels.pinned_kernel_configs`).
On the CPU every op is deterministic already.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

from hetlora_kernels import pinned_kernel_configs

# cuBLAS's reproducible workspace setting (torch raises under deterministic mode without one)
CUBLAS_WORKSPACE = ":4096:8"


def prepare(on: bool) -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for a deterministic run unless the user set it: early,
    before the first cuBLAS call of the process fixes its workspaces (`hetlora simulate` calls
    this before it touches the GPU; a process that used CUDA before is warned)."""
    if not on or "CUBLAS_WORKSPACE_CONFIG" in os.environ:
        return
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        warnings.warn(f"deterministic: CUBLAS_WORKSPACE_CONFIG is set to {CUBLAS_WORKSPACE} after this process "
                      "initialised CUDA; cuBLAS may keep the workspaces it chose, and torch builds that check "
                      "the variable may refuse matmuls. Set it before the process starts for reproducible runs",
                      RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """torch's deterministic algorithms inside the block when ``on`` (the previous mode after it,
    also when the block raises); nothing at all when not ``on``."""
    if not on:
        yield
        return
    prepare(True)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pinned_kernel_configs():
            yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
