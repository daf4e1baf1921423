"""The mixed-rank LoRA ops as ``torch.library`` custom ops: what ``torch.compile`` sees.

Eager calls of `hetlora_kernels.lora_delta` / `lora_linear` go straight to a backend's
autograd function.  Under ``torch.compile`` (``torch.compiler.is_compiling()``) they go through
two opaque ops instead, ``hetlora::lora_delta_fwd`` and ``hetlora::lora_delta_bwd``, with a
registered autograd formula and shape functions: Dynamo traces a layer without a graph break,
AOTAutograd puts the backward op in the backward graph, and Inductor compiles what lies
around them (the base GEMM, the add, the model's other layers).

Routing crosses the graph as tensors only: the groups' device tensors and one small host
(CPU) int64 tensor, ``TokenGroups.host_meta`` (starts, counts, whether sorted).  So a new batch
composition is new tensor *values*, never a new graph: nothing is specialised on how many
tokens each adapter has.  At run time the ops find the `TokenGroups` that made ``host_meta``
(its cached kernel schedules with it) or rebuild one from the tensors, validate every argument
as an eager call does, and run the backend that `dispatch` picks then.

Both ops carry ``torch.Tag.cudagraph_unsafe``: with ``mode="reduce-overhead"`` Inductor captures
the graph around them in CUDA graphs and runs them eagerly (their schedules depend on the batch).

The forward returns ``h = x A_k^T`` for the backward in one format every backend reads and
writes: ``[T, r_max]`` in the accumulation dtype (float64 for float64 inputs, else float32),
row ``p`` = position ``p`` of ``groups.order``, columns ``j < r_k`` defined.  So a backward may
run on another backend than its forward (``use_backend`` around only one of them).
"""

from __future__ import annotations

import numbers

import torch

from . import checks
from . import reference as ref
from .dispatch import LoraWork, resolve
from .layout import AdapterLayout, TokenGroups, groups_of

__all__ = ["lora_delta", "lora_linear"]

_LAYOUTS: dict[tuple[int, ...], AdapterLayout] = {}


def _layout(ranks: list[int]) -> AdapterLayout:
    key = tuple(ranks)
    lay = _LAYOUTS.get(key)
    if lay is None:
        if len(_LAYOUTS) >= 256:  # adapters of ever new ranks: keep the cache bounded
            _LAYOUTS.clear()
        lay = _LAYOUTS[key] = AdapterLayout(key)
    return lay


def _groups(adapter_ids, order, starts, counts, host_meta) -> TokenGroups:
    """The `TokenGroups` behind these tensors: the one that built ``host_meta`` when it is still
    alive and its tensors are these (so its cached kernel schedules serve every layer), else one
    rebuilt from them (no device read: the host lists come from ``host_meta``)."""
    g = groups_of(host_meta)
    # the same storage, not the same object: AOTAutograd hands the backward other tensor objects
    # over the saved ones
    if g is not None and all(a.data_ptr() == b.data_ptr() and a.shape == b.shape
                             for a, b in ((g.order, order), (g.starts, starts), (g.adapter_ids, adapter_ids))):
        return g
    K = counts.shape[0]
    host = host_meta.tolist()
    return TokenGroups(adapter_ids, K, order, starts, counts, tuple(host[K + 1: 2 * K + 1]),
                       tuple(host[: K + 1]), bool(host[2 * K + 1]), _trusted=True)


def _scaling(scale_tensor: torch.Tensor | None, scales: list[float]):
    if scale_tensor is not None and scale_tensor.device.type == "cpu":
        # host scalings (a layer's, under compile): their values, as the eager call passes them
        # (reading host memory costs no device synchronisation; copying it to a GPU would)
        scales = scale_tensor.reshape(-1).tolist()
    elif scale_tensor is not None:
        return scale_tensor
    return scales[0] if len(scales) == 1 else scales


def _backend(x: torch.Tensor, groups: TokenGroups):
    work = LoraWork(routed=groups.num_routed, active=groups.num_active, grouped=groups.is_sorted, dtype=x.dtype)
    name, _ = resolve("lora_delta", x.device, work)
    return _STEPS[name]()


def _steps_torch():
    return ref.lora_forward, ref.lora_backward


def _steps_triton():
    from .triton import lora

    return lora.lora_forward, lora.lora_backward


def _steps_cuda():
    from . import cuda

    return cuda.lora_forward, cuda.lora_backward


_STEPS = {"torch": _steps_torch, "triton": _steps_triton, "cuda": _steps_cuda}


# cudagraph_unsafe: each call builds its kernel schedule from this batch's host facts, so a replay
# of a captured call would run the schedule of the batch it was captured with. Inductor's
# CUDA graphs (mode="reduce-overhead") therefore capture the graph around these ops, not them.
_TAGS = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("hetlora::lora_delta_fwd", mutates_args=(), tags=_TAGS)
def _fwd(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, adapter_ids: torch.Tensor, order: torch.Tensor,
         starts: torch.Tensor, counts: torch.Tensor, host_meta: torch.Tensor, ranks: list[int],
         scale_tensor: torch.Tensor | None, scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(ranks)
    groups = _groups(adapter_ids, order, starts, counts, host_meta)
    x, A, B, layout, groups, scaling = ref.prepare_lora_delta(x, A, B, layout, groups, _scaling(scale_tensor, scales))
    forward, _ = _backend(x, groups)
    y, h = forward(x, A, B, layout, groups, scaling)
    return y.contiguous(), h.contiguous()  # the strides the shape function promises


@_fwd.register_fake
def _fwd_fake(x, A, B, adapter_ids, order, starts, counts, host_meta, ranks, scale_tensor, scales):
    _check_shapes(x, A, B, adapter_ids, ranks)
    T = x.shape[0]
    return x.new_empty(T, B.shape[1]), x.new_empty(T, max(ranks), dtype=ref._acc_dtype(x))


def _check_shapes(x, A, B, adapter_ids, ranks) -> None:
    # the run-time op validates everything; these are the facts the shapes of its results rest on
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, d_in], got shape {tuple(x.shape)}")
    R = sum(ranks)
    if A.dim() != 2 or A.shape[0] != R or A.shape[1] != x.shape[1]:
        raise ValueError(f"A must be [R={R}, d_in={x.shape[1]}], got shape {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[0] != R:
        raise ValueError(f"B must be [R={R}, d_out], got shape {tuple(B.shape)}")
    if adapter_ids.shape[0] != x.shape[0]:
        raise ValueError(f"groups cover {adapter_ids.shape[0]} tokens but x holds {x.shape[0]}")


@torch.library.custom_op("hetlora::lora_delta_bwd", mutates_args=(), tags=_TAGS)
def _bwd(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, h: torch.Tensor,
         adapter_ids: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
         host_meta: torch.Tensor, ranks: list[int], scale_tensor: torch.Tensor | None, scales: list[float],
         needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = _layout(ranks)
    groups = _groups(adapter_ids, order, starts, counts, host_meta)
    # the forward validated these same inputs: only the scaling's normalised form is needed here
    scaling = checks.check_scaling(_scaling(scale_tensor, scales), layout.num_adapters, x.device)
    _, backward = _backend(x, groups)
    grads = backward(dy.contiguous(), x, A, B, h, layout, groups, scaling, tuple(needs))
    # a custom op returns tensors, never None, and no two of them may alias: a gradient not asked
    # for comes back as its own empty tensor.  Contiguous, as the shape function says (the torch
    # path's zeros_like would copy a transposed parameter's strides).
    return tuple(g.contiguous() if g is not None else x.new_empty(0) for g in grads)


@_bwd.register_fake
def _bwd_fake(dy, x, A, B, h, adapter_ids, order, starts, counts, host_meta, ranks, scale_tensor, scales, needs):
    return tuple(t.new_empty(t.shape) if need else t.new_empty(0) for t, need in zip((x, A, B), needs))


def _setup_context(ctx, inputs, output) -> None:
    x, A, B, adapter_ids, order, starts, counts, host_meta, ranks, scale_tensor, scales = inputs
    ctx.ranks, ctx.scales, ctx.has_scale_tensor = ranks, scales, scale_tensor is not None
    ctx.save_for_backward(x, A, B, output[1], adapter_ids, order, starts, counts, host_meta,
                          scale_tensor if scale_tensor is not None else x.new_empty(0))


def _backward(ctx, dy, dh):
    x, A, B, h, adapter_ids, order, starts, counts, host_meta, scale_tensor = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    if not any(needs):
        return (None,) * 11
    dx, dA, dB = _bwd(dy, x, A, B, h, adapter_ids, order, starts, counts, host_meta, ctx.ranks,
                      scale_tensor if ctx.has_scale_tensor else None, ctx.scales, needs)
    return (dx if needs[0] else None, dA if needs[1] else None, dB if needs[2] else None) + (None,) * 8


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _scaling_args(scaling, K: int) -> tuple[torch.Tensor | None, list[float]]:
    if isinstance(scaling, torch.Tensor):
        # a 0-dim tensor is one scaling for every adapter (eager reads it with .item(), a graph break)
        return (scaling.reshape(1).repeat(K) if scaling.dim() == 0 else scaling), []
    if isinstance(scaling, numbers.Real) and not isinstance(scaling, bool):
        return None, [checks.finite_real(scaling, "scaling")]
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != K:  # (a one-entry list would otherwise pass for a float)
            raise ValueError(f"scaling must be a float or hold K={K} values, got {len(scaling)}")
        return None, [checks.finite_real(s, f"scaling[{i}]") for i, s in enumerate(scaling)]
    raise TypeError(f"scaling must be a float, a sequence of K={K} floats or a [K] tensor, "
                    f"got {type(scaling).__name__}")


def lora_delta(x, A, B, layout: AdapterLayout, groups: TokenGroups, scaling) -> torch.Tensor:
    """`hetlora_kernels.lora_delta` through the custom ops (the route under ``torch.compile``)."""
    if not isinstance(layout, AdapterLayout):
        raise TypeError(f"layout must be an AdapterLayout, got {type(layout).__name__}")
    if not isinstance(groups, TokenGroups):
        raise TypeError(f"groups must be a TokenGroups, got {type(groups).__name__}")
    scale_tensor, scales = _scaling_args(scaling, layout.num_adapters)
    y, _ = _fwd(x, A, B, groups.adapter_ids, groups.order, groups.starts, groups.counts, groups.host_meta,
                list(layout.ranks), scale_tensor, scales)
    return y


def lora_linear(x, weight, bias, A, B, layout: AdapterLayout, groups: TokenGroups, scaling) -> torch.Tensor:
    """`hetlora_kernels.lora_linear` through the custom ops: the base GEMM and the add are left
    to the compiler."""
    return torch.nn.functional.linear(x, weight, bias) + lora_delta(x, A, B, layout, groups, scaling)



