"""Public ops: validate once, then run the backend chosen by `dispatch`.

Shapes and semantics are those of `hetlora_kernels.reference` (DESIGN.md sections 2, 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import custom_ops
from . import reference as ref
from .dispatch import LoraWork, get_backend, resolve
from .layout import AdapterLayout, TokenGroups


def _work(x: torch.Tensor, groups: TokenGroups) -> LoraWork:
    # host-side facts only (counts_list is on the host): no device synchronisation
    return LoraWork(routed=groups.num_routed, active=groups.num_active,
                    grouped=groups.is_sorted, dtype=x.dtype)


def _autocast_inputs(x: torch.Tensor, *ts):
    """Under ``torch.autocast`` the LoRA ops do what it does to ``F.linear``: float32 inputs are
    cast to the autocast dtype, and the op runs in it (None when autocast is off here)."""
    if not isinstance(x, torch.Tensor):
        return None  # the validation names the argument
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t for t in (x, *ts))


def lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """Mixed-rank LoRA delta ``[T, d_out]``: ``y[t] = s_k (x[t] A_k^T) B_k``; 0 where id is -1.

    Args:
        x: ``[T, d_in]`` float32/float16/bfloat16/float64.
        A: ``[R, d_in]``, B: ``[R, d_out]``, packed rank-major for ``layout``, x's dtype.
        layout: the adapters' ranks.  groups: this batch's token grouping (T tokens).
        scaling: float or ``[K]`` tensor (not differentiated).
    Returns ``[T, d_out]`` in x's dtype, differentiable in x, A and B.
    Sums accumulate in float32; in float16/bfloat16 the intermediate ``h = x A_k^T`` is rounded
    to the input dtype before its product with ``B_k``, as torch's half matmuls round it (the
    C++ CPU kernels keep it in float32), so where ``h`` overflows float16 the result is inf.
    Under ``torch.compile`` it is two opaque custom ops (`hetlora_kernels.custom_ops`); under
    ``torch.autocast`` float32 inputs are cast to its dtype first, as for ``F.linear``.
    """
    cast = _autocast_inputs(x, A, B)
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return lora_delta(*cast, layout, groups, scaling)
    if torch.compiler.is_compiling():
        return custom_ops.lora_delta(x, A, B, layout, groups, scaling)
    args = ref.prepare_lora_delta(x, A, B, layout, groups, scaling)
    return resolve("lora_delta", x.device, _work(x, groups))[1](*args)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """``x weight^T + bias + lora_delta(x, A, B, ...)``: weight ``[d_out, d_in]``, bias ``[d_out]`` or None."""
    cast = _autocast_inputs(x, weight, bias, A, B)
    if cast is not None:
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(cast[0], cast[1], cast[2], cast[3], cast[4], layout, groups, scaling)
    if torch.compiler.is_compiling():
        return custom_ops.lora_linear(x, weight, bias, A, B, layout, groups, scaling)
    args = ref.prepare_lora_linear(x, weight, bias, A, B, layout, groups, scaling)
    return resolve("lora_linear", x.device, _work(x, groups))[1](*args)


# The server ops run eagerly under torch.compile (a graph break each): their validation reads
# values back (finite weights), and the C++ extension's functions are opaque to Dynamo.
_eager = torch.compiler.disable


def _device(A) -> torch.device:
    t = A[0] if isinstance(A, (list, tuple)) and A else A
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def _server_backend(op: str, A, B) -> object:
    """The implementation of server op ``op``.  Only the torch path is differentiable for
    `delta_fro_norms`, `weighted_aggregate` and `truncate`: where an input requires grad (and grad
    mode is on), ``auto`` runs it, and another chosen backend is refused rather than returning a
    detached result."""
    ts = [t for part in (A, B) for t in (part if isinstance(part, (list, tuple)) else [part])]
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts):
        name = get_backend()
        if name not in ("auto", "torch"):
            raise ValueError(f"{op} is differentiable only on the torch backend, and its inputs require grad "
                             f"under backend {name!r}: use 'auto' or 'torch', or pass detached tensors")
        return ref.IMPLS[op]
    return resolve(op, _device(A))[1]


@_eager
def component_norms(A, B, layout: AdapterLayout, reduce: str = "none") -> torch.Tensor:
    """Per component ``||a_kj|| * ||b_kj||``: ``[K, r_max]``, 0 past ``r_k``.

    With lists of per-layer tensors: ``[L, K, r_max]``, or ``[K, r_max]`` summed over
    layers when ``reduce="sum"``.  Differentiable (float32 result for half inputs).
    """
    args, extra = ref.prepare_component_norms(A, B, layout, reduce)
    return ref.finish_component_norms(resolve("component_norms", _device(A))[1](*args), extra)


@_eager
def delta_fro_norms(A, B, layout: AdapterLayout, scaling: float | torch.Tensor | None = None) -> torch.Tensor:
    """``||s_k B_k^T A_k||_F`` per adapter: ``[K]`` (``[L, K]`` for lists), via two ``r_k x r_k`` Grams.
    Differentiable on the torch path, which ``auto`` takes when an input requires grad."""
    args, was_list = ref.prepare_delta_fro_norms(A, B, layout, scaling)
    return ref.finish_delta_fro_norms(_server_backend("delta_fro_norms", A, B)(*args), was_list)


@_eager
def weighted_aggregate(A, B, layout: AdapterLayout, weights, out_rank: int | None = None):
    """Zero-pad every adapter to ``out_rank`` (default ``max_rank``) and sum with ``weights [K]``.

    Returns ``(A_g [out_rank, d_in], B_g [out_rank, d_out])`` (lists of them for list
    inputs).  Raises ``ValueError`` naming the adapter whose rows are not finite.  Differentiable
    on the torch path, which ``auto`` takes when an input requires grad.
    """
    args, was_list = ref.prepare_weighted_aggregate(A, B, layout, weights, out_rank)
    return ref.finish_pair(_server_backend("weighted_aggregate", A, B)(*args), was_list)


@_eager
def truncate(A_g, B_g, ranks: Sequence[int] | AdapterLayout):
    """Distribute the global ``A_g [r, d_in]``, ``B_g [r, d_out]``: rows ``0:r_k`` per adapter.

    Returns ``(A [R, d_in], B [R, d_out], layout)`` (lists of A and B for list inputs).
    Differentiable on the torch path, which ``auto`` takes when an input requires grad.
    """
    args, was_list = ref.prepare_truncate(A_g, B_g, ranks)
    return ref.finish_truncate(_server_backend("truncate", A_g, B_g)(*args), was_list, args[2])
