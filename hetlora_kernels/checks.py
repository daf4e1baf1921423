"""Argument validation shared by every backend: a clear exception naming the argument."""

from __future__ import annotations

import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .layout import AdapterLayout, TokenGroups, to_device

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(t: object, name: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def check_layout(layout: object) -> AdapterLayout:
    if not isinstance(layout, AdapterLayout):
        raise TypeError(f"layout must be an AdapterLayout, got {type(layout).__name__}")
    return layout


def check_factors(A: torch.Tensor, B: torch.Tensor, layout: AdapterLayout, a_name: str = "A", b_name: str = "B"):
    """``A [R, d_in]``, ``B [R, d_out]`` packed for ``layout``, same dtype and device."""
    check_tensor(A, a_name, 2)
    check_tensor(B, b_name, 2)
    check_layout(layout)
    if A.shape[0] != layout.total_rank:
        raise ValueError(
            f"{a_name} has {A.shape[0]} rows but layout.total_rank is {layout.total_rank} (ranks {list(layout.ranks)})"
        )
    if B.shape[0] != layout.total_rank:
        raise ValueError(
            f"{b_name} has {B.shape[0]} rows but layout.total_rank is {layout.total_rank} (ranks {list(layout.ranks)})"
        )
    if A.dtype != B.dtype:
        raise TypeError(f"{b_name} dtype {B.dtype} differs from {a_name} dtype {A.dtype}")
    if A.device != B.device:
        raise ValueError(f"{b_name} is on {B.device} but {a_name} is on {A.device}")


# Sequences of scalings -> their float64 device tensor, reused.  A layer passes the same host
# list on every call; building the tensor each time is a host-to-device copy, which torch
# follows with a stream synchronisation on a GPU: one per layer per forward.  The tensors are
# only ever read (the kernels take them as scale pointers), so sharing one is safe.
_SEQ_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_SEQ_CACHE_MAX = 256
_SEQ_LOCK = threading.Lock()
_HOST_VALUES: dict[int, tuple[torch.Tensor, tuple[float, ...]]] = {}  # id -> (the tensor, its values)
_FLOAT32_COPY: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (the tensor, its float32 copy)


def host_values(t: torch.Tensor) -> tuple[float, ...] | None:
    """The host values of a scaling tensor made by `check_scaling` from a sequence (so that the
    torch path need not read them back from a GPU), else None."""
    hit = _HOST_VALUES.get(id(t))
    return hit[1] if hit is not None and hit[0] is t else None


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32: for a scaling tensor made by `check_scaling` from a sequence, one cached
    copy (the kernels read float32 scales; a cast per call is a kernel launch per layer call)."""
    if t.dtype == torch.float32:
        return t
    hit = _FLOAT32_COPY.get(id(t))
    if hit is not None and hit[0] is t:
        return hit[1]
    return t.to(torch.float32)


def _cached_scaling(scaling: Sequence, device: torch.device) -> torch.Tensor | None:
    """The cached tensor of a sequence of Python floats, or None (not cached, or other types).

    Only exact floats qualify: a bool or an int equal to a cached float must still be
    checked (and a bool rejected) by the slow path."""
    values = tuple(scaling)
    if not all(type(v) is float for v in values):
        return None
    return _cache_get((values, str(device)))


def _cache_get(key: tuple) -> torch.Tensor | None:
    """The cached scaling tensor under ``key = (values, device)``, marked recently used; or None."""
    with _SEQ_LOCK:
        t = _SEQ_CACHE.get(key)
        if t is not None:
            _SEQ_CACHE.move_to_end(key)
        return t


def _scaling_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    key = (values, str(device))
    t = _cache_get(key)
    if t is not None:
        return t
    t = to_device(torch.tensor(values, dtype=torch.float64), torch.device(device))
    with _SEQ_LOCK:
        _SEQ_CACHE[key] = t
        _HOST_VALUES[id(t)] = (t, values)
        _FLOAT32_COPY[id(t)] = (t, t.to(torch.float32))
        while len(_SEQ_CACHE) > _SEQ_CACHE_MAX:
            _, old = _SEQ_CACHE.popitem(last=False)
            _HOST_VALUES.pop(id(old), None)
            _FLOAT32_COPY.pop(id(old), None)
    return t


def finite_real(v: object, name: str) -> float:
    """``v`` as a float: a finite real number, never a bool (``ValueError`` naming ``name``)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_scaling(scaling: object, num_adapters: int, device: torch.device) -> float | torch.Tensor:
    """A finite float, or a finite ``[K]`` tensor.  Returns a float or a ``[K]`` tensor: float64
    for a float64 tensor or a sequence (so that float64 ops keep full precision), else float32.
    The tensor made for a sequence is cached per (values, device) and must not be modified."""
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() == 0:
            scaling = scaling.item()
        else:
            if scaling.shape != (num_adapters,):
                raise ValueError(
                    f"scaling must be a float or a [K={num_adapters}] tensor, got shape {tuple(scaling.shape)}"
                )
            if not (scaling.dtype.is_floating_point or scaling.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"scaling must be a float tensor, got {scaling.dtype}")
            if not bool(torch.isfinite(scaling).all()):
                raise ValueError("scaling must be finite, got a non-finite entry")
            dtype = torch.float64 if scaling.dtype == torch.float64 else torch.float32
            return scaling.detach().to(device=device, dtype=dtype)
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        if isinstance(scaling, Sequence) and not isinstance(scaling, (str, bytes)):
            # checked on the host, so a list costs no device synchronisation
            if len(scaling) != num_adapters:
                raise ValueError(f"scaling must be a float or hold K={num_adapters} values, got {len(scaling)}")
            # fast path (a model's layers pass the same K floats on every call): values already
            # in the cache were validated when they entered it
            hit = _cached_scaling(scaling, torch.device(device))
            if hit is not None:
                return hit
            vals = tuple(finite_real(v, f"scaling[{i}]") for i, v in enumerate(scaling))
            return _scaling_tensor(vals, torch.device(device))
        raise TypeError(f"scaling must be a float or a [K] tensor, got {type(scaling).__name__}")
    s = float(scaling)
    if not math.isfinite(s):
        raise ValueError(f"scaling must be finite, got {s}")
    return s


def check_lora_inputs(x, A, B, layout, groups, scaling):
    """Validate the arguments of ``lora_delta``; returns the normalised scaling."""
    check_tensor(x, "x", 2)
    check_factors(A, B, layout)
    if not isinstance(groups, TokenGroups):
        raise TypeError(f"groups must be a TokenGroups, got {type(groups).__name__}")
    if x.shape[1] != A.shape[1]:
        raise ValueError(f"x has d_in={x.shape[1]} but A has {A.shape[1]} columns")
    if x.dtype != A.dtype:
        raise TypeError(f"A dtype {A.dtype} differs from x dtype {x.dtype}")
    if x.device != A.device:
        raise ValueError(f"A is on {A.device} but x is on {x.device}")
    if groups.num_tokens != x.shape[0]:
        raise ValueError(f"groups cover {groups.num_tokens} tokens but x has T={x.shape[0]} rows")
    if groups.num_adapters != layout.num_adapters:
        raise ValueError(f"groups were built for {groups.num_adapters} adapters but layout has {layout.num_adapters}")
    if groups.device != x.device:
        raise ValueError(f"groups are on {groups.device} but x is on {x.device}")
    return check_scaling(scaling, layout.num_adapters, x.device)


def check_base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, d_out: int):
    check_tensor(weight, "weight", 2)
    if weight.shape != (d_out, x.shape[1]):
        raise ValueError(f"weight must be [d_out={d_out}, d_in={x.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        if bias.shape[0] != d_out:
            raise ValueError(f"bias must be [d_out={d_out}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def as_layer_lists(A, B, a_name: str = "A", b_name: str = "B") -> tuple[list, list, bool]:
    """Normalise one tensor pair or per-layer lists to lists; returns (As, Bs, was_list)."""
    if isinstance(A, (list, tuple)) or isinstance(B, (list, tuple)):
        if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
            raise TypeError(f"{a_name} and {b_name} must both be tensors or both be lists of tensors")
        if len(A) != len(B):
            raise ValueError(f"{a_name} has {len(A)} layers but {b_name} has {len(B)}")
        if len(A) == 0:
            raise ValueError(f"{a_name} must hold at least one layer, got an empty list")
        return list(A), list(B), True
    return [A], [B], False


def check_weights(weights: object, num_adapters: int, device: torch.device) -> torch.Tensor:
    """Finite ``[K]`` weights as a float64 tensor on ``device``."""
    if not isinstance(weights, torch.Tensor):
        if isinstance(weights, Sequence) and any(isinstance(w, bool) for w in weights):
            raise TypeError(f"weights must be real numbers, got a bool in {list(weights)!r}")
        try:
            weights = torch.as_tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"weights must be a [K] tensor or a sequence of floats: {e}") from None
    if weights.dim() != 1 or weights.shape[0] != num_adapters:
        raise ValueError(f"weights must be [K={num_adapters}], got shape {tuple(weights.shape)}")
    if not (weights.dtype.is_floating_point or weights.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"weights must be real, got {weights.dtype}")
    w = weights.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).nonzero()[0, 0])
        raise ValueError(f"weights must be finite, weights[{bad}] = {w[bad].item()}")
    return w


def check_finite_per_adapter(t: torch.Tensor, layout: AdapterLayout, name: str) -> None:
    """Raise naming the first adapter (client) whose rows hold NaN/Inf."""
    if t.numel() == 0:
        return
    # one min/max pass (NaN propagates through both) is ~10x cheaper than isfinite over
    # every element; the rows are searched only when something is wrong
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad_rows = ~torch.isfinite(t).all(dim=1)
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        k = int(layout.row_adapter(t.device)[row])
        raise ValueError(f"{name} holds non-finite values in adapter {k} (row {row})")


def as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)
