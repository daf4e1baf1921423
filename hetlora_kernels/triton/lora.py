"""Autograd wiring of the mixed-rank LoRA kernels: the triton ``lora_delta`` / ``lora_linear``.

Forward (2 launches): ``h = shrink(x, A)`` (fp32, kept for the backward), ``y = expand(h, B)``;
for small batches (``fused.use_fused``: launch latency dominates) one fused launch that
also writes ``h``.
Backward (4 launches, +2 on the two-stage weight-gradient path):
``g = shrink(dy, B, s)``, ``dx = expand(g, A)``, ``dA = wgrad(g, x)``, ``dB = wgrad(h, dy, s)``
(with ``PAIR_WGRAD``, dA and dB in one launch; with ``FUSED_BACKWARD``, g and dx in one
launch through the fused kernel with A and B swapped: 2 launches with both).
``lora_linear`` runs the base GEMM with torch (``F.linear``) and lets the expand kernels
add the LoRA terms into its output (forward) and into ``dy W`` (backward) in place, which
saves one pass over ``[T, d_out]`` and one over ``[T, d_in]``.

Inputs fp32/fp16/bf16 accumulate in fp32; results come back in the input dtype. float64
inputs are served by the torch reference implementation (Triton's tensor-core paths do
not cover them and the reference is exact there).  Weight gradients are bitwise
reproducible run to run (no atomics).  Not twice differentiable.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import reference
from ..layout import AdapterLayout, TokenGroups
from .expand import expand
from .fused import fused_forward, use_fused
from .shrink import shrink
from .wgrad import wgrad, wgrad_pair

# Opt-in: both weight gradients in one launch (`wgrad.wgrad_pair`; same bits). The first GPU
# sweep found the triton calls host-bound at ~100 us of host time per launch on that machine;
# `python -m bench profile` times this both ways, and the next measurement decides the default.
PAIR_WGRAD = False
# Opt-in: the backward's dx path through the fused forward kernel with A and B swapped
# (``dx = s (dy B^T) A`` has the forward's shape): one launch instead of shrink + expand, at
# the price of recomputing ``dy B^T`` once per output column block, as the fused forward
# does. Measured both ways by `python -m bench profile`; off until a GPU says otherwise.
FUSED_BACKWARD = False


def _on(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row stride but need unit column stride."""
    return t if (t.dim() == 2 and t.stride(1) == 1) or t.numel() == 0 else t.contiguous()


def _forward(x, A, B, layout, groups, scaling, out, zeroed=False):
    if use_fused(groups, layout, x.shape[1], B.shape[1], x.element_size()):
        return fused_forward(x, A, B, layout, groups, scaling, out, zeroed=zeroed)
    h = shrink(x, A, layout, groups, zeroed=zeroed)
    y = expand(h, B, layout, groups, scaling, out=out)
    return y, h


def _backward(ctx, dy, x, A, B, h, dx_out):
    """LoRA gradients; ``dx_out`` (if given) receives the dx term in place."""
    layout, groups, scaling = ctx.layout, ctx.groups, ctx.scaling
    saved = getattr(ctx, "scaling_version", None)  # (the custom ops' route passes no autograd ctx)
    if saved is not None and isinstance(scaling, torch.Tensor) and scaling._version != saved:
        # the tensor may be the caller's own (a [K] float32 on x's device is not copied): the
        # backward would scale by values the forward never used (autograd's own in-place check)
        raise RuntimeError("scaling was modified in place after the forward that saved it for the backward")
    need_x, need_A, need_B = ctx.lora_needs
    dy = _rowmajor(dy)
    dx = dA = dB = None
    if need_x or need_A:
        if need_x and FUSED_BACKWARD:
            # g = dy B^T unscaled (by position); dx = s g A, into dx_out when given
            dx, g = fused_forward(dy, B, A, layout, groups, scaling, dx_out)
            g_scaled = False
        else:
            g = shrink(dy, B, layout, groups, scaling)  # s dy B^T
            g_scaled = True
            if need_x:
                dx = expand(g, A, layout, groups, 1.0, out=dx_out)
        if need_A and need_B and PAIR_WGRAD:
            dA, dB = wgrad_pair(g, x, h, dy, layout, groups, scaling, scale_a=not g_scaled)
            return dx, dA, dB
        if need_A:
            dA = wgrad(g, x, layout, groups, 1.0 if g_scaled else scaling)
    if need_B:
        dB = wgrad(h, dy, layout, groups, scaling)
    return dx, dA, dB


class _LoraDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, layout, groups, scaling):
        x, A, B = _rowmajor(x), A.contiguous(), B.contiguous()
        with _on(x.device):
            y, h = _forward(x, A, B, layout, groups, scaling, None)
        ctx.layout, ctx.groups, ctx.scaling = layout, groups, scaling
        ctx.scaling_version = scaling._version if isinstance(scaling, torch.Tensor) else None
        ctx.lora_needs = ctx.needs_input_grad[:3]
        # x only feeds dA, h only dB: keep neither alive when it is not needed
        _, need_A, need_B = ctx.lora_needs
        ctx.save_for_backward(x if need_A else None, A, B, h if need_B else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, A, B, h = ctx.saved_tensors
        with _on(A.device):
            dx, dA, dB = _backward(ctx, dy, x, A, B, h, None)
        return dx, dA, dB, None, None, None


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, layout, groups, scaling):
        x, A, B = _rowmajor(x), A.contiguous(), B.contiguous()
        base = F.linear(x, weight, bias)
        if base.stride(1) != 1:
            base = base.contiguous()
        with _on(x.device):
            y, h = _forward(x, A, B, layout, groups, scaling, base)
        ctx.layout, ctx.groups, ctx.scaling = layout, groups, scaling
        ctx.scaling_version = scaling._version if isinstance(scaling, torch.Tensor) else None
        n = ctx.needs_input_grad
        ctx.lora_needs = (n[0], n[3], n[4])
        ctx.base_needs = (n[1], n[2] and bias is not None)
        keep_x = n[1] or n[3]  # x feeds dW and dA
        ctx.save_for_backward(x if keep_x else None, weight, A, B, h if n[4] else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, A, B, h = ctx.saved_tensors
        need_w, need_b = ctx.base_needs
        dy = _rowmajor(dy)
        dx_base = dy.mm(weight) if ctx.lora_needs[0] else None
        with _on(A.device):
            dx, dA, dB = _backward(ctx, dy, x, A, B, h, dx_base)
        dW = dy.t().mm(x) if need_w else None
        db = dy.sum(0) if need_b else None
        return dx, dW, db, dA, dB, None, None, None


def lora_delta_impl(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """``y [T, d_out] = s_k (x[t] A_k^T) B_k`` per token, 0 for ``-1`` tokens.

    Args (validated by ``reference.prepare_lora_delta``):
        x: ``[T, d_in]`` fp32/fp16/bf16 (float64 goes to the torch reference), any strides.
        A: ``[R, d_in]``, B: ``[R, d_out]`` packed for ``layout``, x's dtype and device.
        scaling: Python float, or fp32 ``[K]`` tensor on x's device (not differentiated).
    Returns ``[T, d_out]`` in x's dtype, differentiable in x, A and B.
    """
    if x.dtype == torch.float64:
        return reference.lora_delta_impl(x, A, B, layout, groups, scaling)
    return _LoraDelta.apply(x, A, B, layout, groups, scaling)


def lora_linear_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    layout: AdapterLayout,
    groups: TokenGroups,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """``x weight^T + bias + lora_delta(x, A, B, ...)``: ``[T, d_out]`` in x's dtype.

    weight ``[d_out, d_in]`` and bias ``[d_out]`` (or None) in x's dtype; differentiable in
    x, weight, bias, A and B.  float64 goes to the torch reference.
    """
    if x.dtype == torch.float64:
        return reference.lora_linear_impl(x, weight, bias, A, B, layout, groups, scaling)
    return _LoraLinear.apply(x, weight, bias, A, B, layout, groups, scaling)


class _Steps:
    """The fields `_backward` reads from an autograd ctx."""

    def __init__(self, layout, groups, scaling, needs):
        self.layout, self.groups, self.scaling, self.lora_needs = layout, groups, scaling, needs


def lora_forward(x, A, B, layout: AdapterLayout, groups: TokenGroups, scaling):
    """The forward alone (`hetlora_kernels.custom_ops`): ``(y, h)``, h fp32 ``[T, r_max]`` by
    position in ``groups.order``, zeros where undefined (float64 inputs: the torch reference's)."""
    if x.dtype == torch.float64:
        return reference.lora_forward(x, A, B, layout, groups, scaling)
    x, A, B = _rowmajor(x), A.contiguous(), B.contiguous()
    with _on(x.device):
        return _forward(x, A, B, layout, groups, scaling, None, zeroed=True)


def lora_backward(dy, x, A, B, h, layout: AdapterLayout, groups: TokenGroups, scaling, needs):
    """The backward alone: ``(dx, dA, dB)`` (None where ``needs`` is False) from any backend's h."""
    if x.dtype == torch.float64:
        return reference.lora_backward(dy, x, A, B, h, layout, groups, scaling, needs)
    x, A, B = _rowmajor(x), A.contiguous(), B.contiguous()
    with _on(A.device):
        return _backward(_Steps(layout, groups, scaling, tuple(needs)), dy, x, A, B, h.contiguous(), None)


IMPLS = {"lora_delta": lora_delta_impl, "lora_linear": lora_linear_impl}
