"""Per-batch tile schedules and launch settings shared by the mixed-rank LoRA kernels.

A schedule is built once per `TokenGroups` (on the host, from ``starts_list``, so no
device synchronisation) and cached in ``groups._cache``: every layer of a model that
sees the same batch reuses it.  Positions ``p`` below index ``groups.order``: adapter
k's tokens are ``order[starts[k]:starts[k+1]]`` and the ``-1`` tokens are
``order[0:starts[0]]``.
"""

from __future__ import annotations

import functools
import os

import torch

from ..checks import as_float32
from ..layout import TokenGroups, to_device

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# tl.dot needs every block dimension >= 16 on the GPU; the rank tile is kept at that
# minimum so that an adapter of rank r costs ceil(r / 16) tiles, never r_max.
BLOCK_R = 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def token_tiles(groups: TokenGroups, block_t: int) -> tuple[torch.Tensor, int]:
    """Tiles of at most ``block_t`` consecutive positions that never straddle two groups.

    Returns ``(tiles, n_unrouted)``: ``tiles`` is an int32 ``[n_tiles, 3]`` tensor on the
    groups' device, rows ``(adapter, p_start, p_end)`` where ``p_end`` is the end of the
    adapter's whole group (the kernels mask positions ``>= p_end``).  The first
    ``n_unrouted`` rows cover the ``-1`` tokens with ``adapter = -1`` (kernels that must
    write zeros there use them; the others launch over ``tiles[n_unrouted:]``).
    """
    key = ("hetlora_token_tiles", block_t)
    hit = groups._cache.get(key)
    if hit is not None:
        return hit
    starts = groups.starts_list
    rows: list[int] = []
    for p in range(0, starts[0], block_t):
        rows += (-1, p, starts[0])
    n_unrouted = len(rows) // 3
    for k in range(groups.num_adapters):
        for p in range(starts[k], starts[k + 1], block_t):
            rows += (k, p, starts[k + 1])
    tiles = to_device(torch.tensor(rows, dtype=torch.int32).reshape(-1, 3), groups.device)
    groups._cache[key] = (tiles, n_unrouted)
    return tiles, n_unrouted


def routed_tiles(groups: TokenGroups, block_t: int) -> torch.Tensor:
    """``token_tiles(groups, block_t)``'s rows of routed positions alone (cached: slicing each
    call would be one more host op per launch)."""
    key = ("hetlora_routed_tiles", block_t)
    hit = groups._cache.get(key)
    if hit is None:
        tiles, n_unrouted = token_tiles(groups, block_t)
        hit = groups._cache[key] = tiles[n_unrouted:]
    return hit


def token_chunks(groups: TokenGroups, chunk_t: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chunks of an adapter's positions for the weight-gradient reduction.

    ``chunk_t=None`` gives one chunk per adapter (the whole group).  Every adapter has at
    least one chunk, empty for an adapter without tokens, so that a kernel writing one
    result per chunk also writes the zero gradient of an idle adapter.

    Returns ``(chunks, chunk_starts, max_chunks)``: ``chunks`` int32 ``[n_chunks, 3]`` rows
    ``(adapter, p_start, p_end)`` grouped by adapter in order; ``chunk_starts`` int32
    ``[K+1]``, adapter k owns chunks ``chunk_starts[k]:chunk_starts[k+1]``; ``max_chunks``
    the most chunks any adapter has.
    """
    key = ("hetlora_token_chunks", chunk_t)
    hit = groups._cache.get(key)
    if hit is not None:
        return hit
    starts = groups.starts_list
    rows: list[int] = []
    cstarts = [0]
    for k in range(groups.num_adapters):
        s, e = starts[k], starts[k + 1]
        step = max(e - s, 1) if chunk_t is None else chunk_t
        p = s
        while True:
            rows += (k, p, min(p + step, e))
            p += step
            if p >= e:
                break
        cstarts.append(len(rows) // 3)
    dev = groups.device
    chunks = to_device(torch.tensor(rows, dtype=torch.int32).reshape(-1, 3), dev)
    cst = to_device(torch.tensor(cstarts, dtype=torch.int32), dev)
    max_chunks = max(b - a for a, b in zip(cstarts[:-1], cstarts[1:]))
    res = (chunks, cst, max_chunks)
    groups._cache[key] = res
    return res


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (a nominal 132 off the GPU, where it only steers heuristics)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """``(DOT_F32, DOT_PREC)`` for inputs of ``dtype``.

    Half inputs keep their own dtype in ``tl.dot`` (tensor cores, fp32 accumulation),
    except bf16 under the interpreter, which computes bf16 maths on raw bits: there the
    operands are upcast to fp32 first.  In a half dot the fp32 intermediates (``h``, ``g``)
    are rounded to the input dtype first, as the torch reference's half matmuls produce
    them.  fp32 inputs use tf32 only where torch allows it for its own matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), otherwise exact fp32 (``"ieee"``).
    """
    if dtype == torch.float32:
        prec = "tf32" if (not INTERPRET and torch.backends.cuda.matmul.allow_tf32) else "ieee"
        return True, prec
    if dtype == torch.bfloat16 and INTERPRET:
        return True, "ieee"
    return False, "ieee"


def torch_to_tl_scale(scaling, device: torch.device, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """``(scale_ptr, scale_val, HAS_SCALE_PTR)`` kernel arguments for a validated scaling."""
    if isinstance(scaling, torch.Tensor):
        t = as_float32(scaling)
        if t.device != device or not t.is_contiguous():  # the common case dispatches nothing
            t = t.to(device=device).contiguous()
        return t, 1.0, True
    return dummy, float(scaling), False


def tuning(configs: list, kwargs: dict) -> tuple[list, dict]:
    """The configs (and ``triton.autotune`` options) a GPU tries: all of them, or with
    ``HETLORA_TRITON_AUTOTUNE=0`` the first alone, which Triton runs without timing anything.
    Tests set it (bench/gpu_all.sh's test stage): they check results, not speed, and every
    new shape key would otherwise compile and time each config."""
    if os.environ.get("HETLORA_TRITON_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return configs[:1], {k: v for k, v in kwargs.items() if k != "prune_configs_by"}
    return configs, kwargs


def autotune(configs: list, key: list[str], **kwargs):
    """``triton.autotune`` on the GPU (see `tuning`); the bare kernel under the interpreter.

    The interpreter cannot time several configs (no driver), so there the launchers pass
    one fixed config themselves (see ``interpret_meta``).
    """

    def deco(fn):
        # kept on the kernel so that tests can check the tuning spec against the kernel's
        # arguments without a GPU (a key that names no argument is silently ignored)
        fn.autotune_spec = dict(configs=configs, key=key, **kwargs)
        if INTERPRET:
            return fn
        import triton

        tried, options = tuning(configs, kwargs)
        return triton.autotune(configs=tried, key=key, **options)(fn)

    return deco


def interpret_meta(**meta) -> dict:
    """The fixed block sizes to pass explicitly when interpreting; nothing on the GPU."""
    return dict(meta) if INTERPRET else {}


def prune_wide_blocks(block_name: str, dim_name: str):
    """An ``early_config_prune`` dropping configs whose ``block_name`` exceeds the padded
    ``dim_name`` (a 256-wide block over a 64-wide matrix only wastes the tile)."""

    def prune(configs, named_args, **kwargs):
        dim = {**named_args, **kwargs}[dim_name]
        cap = max(64, next_pow2(dim))
        kept = [c for c in configs if c.kwargs[block_name] <= cap]
        return kept or configs[:1]

    return prune
