"""The ``cuda`` backend: the compiled extension ``hetlora_kernels._C`` (csrc/).

``_C`` holds C++ kernels for CPU tensors (always built) and CUDA kernels for CUDA
tensors (built where a CUDA toolkit and a CUDA build of torch exist).  Both implement
the same three segmented GEMM primitives, which compose into every product of the
LoRA forward and backward (DESIGN.md section 2)::

    shrink(x, W)  h[t, j] = s_k x[t] . W[offsets[k] + j]           -> [T, r_max] fp32
    expand(h, W)  y[t]    = s_k sum_j h[t, j] W[offsets[k] + j]      -> [T, d]
    wgrad(h, x)   out[offsets[k] + j] = s_k sum_{t in k} h[t, j] x[t] -> [R, d]

    forward   h = shrink(x, A)          y  = expand(h, B, s)
    backward  g = shrink(dy, B, s)      dx = expand(g, A)
              dA = wgrad(g, x)          dB = wgrad(h, dy, s)

Tokens are reached through the batch's ``TokenGroups.order``/``starts`` (passed to C++
as int64 tensors), so nothing is gathered or padded to ``r_max``; ``h`` and ``g`` are
kept in float32 (float64 for float64 inputs).  Every output element is one thread's
fixed-order sum: results are bitwise reproducible, also across thread counts.

float64 runs natively on both devices.  Non-contiguous inputs are copied to contiguous
ones first.  The server ops serve per-layer lists (one layout, widths free) in one call
each (one kernel launch on CUDA, its layers' pointers in a small device table); lists
that mix dtypes run one call per layer.  ``truncate`` is a row gather, which
``index_select`` already does in one memory-bound pass: it reuses the torch op.

Loading: ``hetlora_kernels._C`` is built by ``pip install --no-build-isolation -e .``.
Without it, ``HETLORA_JIT=1`` compiles the same sources on first use (`build_jit`,
cached under ``build/jit`` of the source checkout); otherwise `available` says why the
backend is off.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import reference
from .checks import as_float32
from .layout import AdapterLayout, TokenGroups

__all__ = ["available", "build_jit", "IMPLS", "extension"]

_ROOT = Path(__file__).resolve().parent.parent
_C = None
_load_error = ""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _build_config():
    """csrc/build.py of the source checkout, loaded by path (it is not installed)."""
    path = _ROOT / "csrc" / "build.py"
    if not path.exists():
        raise RuntimeError(f"the JIT build needs the source checkout's csrc/ directory; {path} does not exist")
    spec = importlib.util.spec_from_file_location("hetlora_csrc_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_jit(verbose: bool = False, build_directory: str | os.PathLike | None = None):
    """Compile ``_C`` from csrc/ with ``torch.utils.cpp_extension.load`` and use it.

    The CUDA kernels are included when torch is a CUDA build and nvcc is found (as in
    setup.py).  Objects are cached in ``build_directory`` (default ``$HETLORA_BUILD_DIR``
    or ``<checkout>/build/jit``), so a second call with unchanged sources only loads.
    Returns the module.  Raises RuntimeError when compilation fails.
    """
    global _C, _load_error
    from torch.utils import cpp_extension

    cfg = _build_config()
    with_cuda, _ = cfg.cuda_plan()
    sources = cfg.cpu_sources() + (cfg.cuda_sources() if with_cuda else [])
    if build_directory is None:
        build_directory = os.environ.get("HETLORA_BUILD_DIR") or _ROOT / "build" / "jit"
    build_directory = Path(build_directory) / ("cuda" if with_cuda else "cpu")
    build_directory.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(
        name="hetlora_kernels_C",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(cfg.CSRC)],
        extra_cflags=list(cfg.CXX_FLAGS) + (["-DWITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=list(cfg.NVCC_FLAGS),
        extra_ldflags=cfg.link_flags(),
        build_directory=str(build_directory),
        with_cuda=with_cuda,
        verbose=verbose,
    )
    _C, _load_error = _checked(mod), ""
    return mod


# std::locale::classic(): a plain function of libstdc++ (no template a header could instantiate)
_CXX_RUNTIME_SYMBOL = "_ZNSt6locale7classicEv"


def carries_own_cxx_runtime(path: str | os.PathLike) -> bool:
    """Whether the shared library at ``path`` holds its own copy of libstdc++.

    Such a copy (a static link) shares locale state with the process's libstdc++ by
    index, and the first C++ error message that formats a number then crashes or loses
    the number.  Detected as: the library's own lookup of ``std::locale::classic``
    finds a definition other than the process's.
    """
    import ctypes

    try:
        own = ctypes.cast(getattr(ctypes.CDLL(str(path)), _CXX_RUNTIME_SYMBOL), ctypes.c_void_p).value
        # dlopen by soname returns the libstdc++ already loaded (by torch), wherever it lies
        ours = ctypes.cast(getattr(ctypes.CDLL("libstdc++.so.6"), _CXX_RUNTIME_SYMBOL), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False  # no C++ runtime in the process, or none exported: nothing to mix
    return own != ours


def _checked(mod):
    """``mod`` if it shares the process's C++ runtime, else RuntimeError naming the fix."""
    path = getattr(mod, "__file__", None)
    if path and carries_own_cxx_runtime(path):
        raise RuntimeError(
            f"{path} was linked with its own copy of libstdc++ (a static link), and two C++ runtimes "
            "in one process crash on the first error message; rebuild it (csrc/build.py's link_flags "
            "names the process's libstdc++.so by path, so a rebuild from this checkout links it dynamically)"
        )
    return mod


def _load() -> None:
    global _C, _load_error
    try:
        from . import _C as mod  # type: ignore[attr-defined]
    except ImportError as e:
        if _truthy("HETLORA_JIT"):
            try:
                build_jit()
            except Exception as e2:  # noqa: BLE001 - reported through available()
                _load_error = f"hetlora_kernels._C is not built and the HETLORA_JIT build failed: {e2}"
            return
        _load_error = (
            f"hetlora_kernels._C is not built ({e}); install with "
            "`pip install --no-build-isolation --no-deps -e .` (add -v to see why a build was skipped) "
            "or set HETLORA_JIT=1 to compile it on first use"
        )
        return
    try:
        _C, _load_error = _checked(mod), ""
    except RuntimeError as e:
        _load_error = str(e)
        if _truthy("HETLORA_JIT"):  # the JIT build links the process's runtime (csrc/build.py)
            try:
                build_jit()
            except Exception as e2:  # noqa: BLE001 - reported through available()
                _load_error += f"; the HETLORA_JIT rebuild failed too: {e2}"


_load()


def extension():
    """The loaded ``_C`` module, or None."""
    return _C


def available(device: torch.device | str) -> tuple[bool, str]:
    """CPU tensors: whether ``_C`` loaded.  CUDA tensors: whether it was built with CUDA."""
    if _C is None:
        return False, _load_error
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if not _C.with_cuda():
            return False, (
                "hetlora_kernels._C was built without its CUDA kernels (the build found no CUDA toolkit "
                "or a CPU-only torch); its C++ kernels serve CPU tensors only"
            )
        return True, ""
    return False, f"hetlora_kernels._C has no kernels for device type {device.type!r}"


def _meta(layout: AdapterLayout, groups: TokenGroups, device: torch.device):
    """(order [T], starts [K+1], offsets [K+1]) int64 on ``device``, and base = #(-1 tokens)."""
    return groups.order, groups.starts, layout.offsets_tensor(device), groups.starts_list[0]


def _split_scaling(scaling: float | torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, float]:
    if isinstance(scaling, torch.Tensor):
        # the kernels read scales in the accumulation dtype: float32 unless the data is float64
        return (scaling if dtype == torch.float64 else as_float32(scaling)), 1.0
    return None, float(scaling)


def _forward_steps(x, A, B, layout, groups, scales, scale: float):
    order, starts, offsets, base = _meta(layout, groups, x.device)
    h = _C.shrink(x, A, order, starts, offsets, None, 1.0, base, layout.max_rank)  # [T, r_max] fp32
    return _C.expand(h, B, order, starts, offsets, scales, scale, base), h  # y [T, d_out]


def _backward_steps(dy, x, A, B, h, layout, groups, scales, scale: float, needs):
    need_x, need_A, need_B = needs
    order, starts, offsets, base = _meta(layout, groups, x.device)
    dy = dy.to(x.dtype)
    dx = dA = dB = None
    if need_x or need_A:
        g = _C.shrink(dy, B, order, starts, offsets, scales, scale, base, layout.max_rank)  # s_k dy B_k^T
        if need_x:
            dx = _C.expand(g, A, order, starts, offsets, None, 1.0, base)
        if need_A:
            dA = _C.wgrad(g, x, order, starts, offsets, None, 1.0, layout.total_rank)
    if need_B:
        dB = _C.wgrad(h, dy, order, starts, offsets, scales, scale, layout.total_rank)
    return dx, dA, dB


class _LoraDelta(torch.autograd.Function):
    """``y[t] = s_k (x[t] A_k^T) B_k`` on the _C kernels; backward of DESIGN.md section 2."""

    @staticmethod
    def forward(ctx, x, A, B, layout: AdapterLayout, groups: TokenGroups, scales, scale: float):
        y, h = _forward_steps(x, A, B, layout, groups, scales, scale)
        ctx.layout, ctx.groups, ctx.scale = layout, groups, scale
        ctx.save_for_backward(x, A, B, h, scales)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, A, B, h, scales = ctx.saved_tensors
        dx, dA, dB = _backward_steps(dy, x, A, B, h, ctx.layout, ctx.groups, scales, ctx.scale,
                                     ctx.needs_input_grad[:3])
        return dx, dA, dB, None, None, None, None


def lora_forward(x, A, B, layout: AdapterLayout, groups: TokenGroups, scaling):
    """The forward alone (`hetlora_kernels.custom_ops`): ``(y, h)``, h ``[T, r_max]`` in the
    accumulation dtype by position in ``groups.order`` (the kernels index theirs by token: one
    gather of ``T x r_max`` values, none when the tokens are already grouped)."""
    scales, scale = _split_scaling(scaling, x.dtype)
    y, h = _forward_steps(x, A, B, layout, groups, scales, scale)
    return y, (h if groups.is_sorted else h.index_select(0, groups.order))


def lora_backward(dy, x, A, B, h, layout: AdapterLayout, groups: TokenGroups, scaling, needs):
    """The backward alone: ``(dx, dA, dB)`` (None where ``needs`` is False) from any backend's h."""
    scales, scale = _split_scaling(scaling, x.dtype)
    h = h.to(reference._acc_dtype(x))
    if not groups.is_sorted:
        h = torch.empty_like(h).index_copy_(0, groups.order, h)  # back to the kernels' rows by token
    return _backward_steps(dy, x, A, B, h, layout, groups, scales, scale, needs)


def lora_delta_impl(x, A, B, layout, groups, scaling):
    scales, scale = _split_scaling(scaling, x.dtype)
    return _LoraDelta.apply(x, A, B, layout, groups, scales, scale)


def lora_linear_impl(x, weight, bias, A, B, layout, groups, scaling):
    # the dense base GEMM is torch's (cuBLAS / MKL); only the mixed-rank part is ours
    return torch.nn.functional.linear(x, weight, bias) + lora_delta_impl(x, A, B, layout, groups, scaling)


def _same_dtype_runs(As: list, Bs: list) -> list[tuple[list, list]]:
    """All layers in one run when they share a dtype (the usual case), else one run per layer."""
    if all(a.dtype == As[0].dtype for a in As):
        return [(As, Bs)]
    return [([a], [b]) for a, b in zip(As, Bs)]


class _ComponentNorms(torch.autograd.Function):
    """``[L, K, r_max]`` ``||a_kj|| ||b_kj||`` over all layers in one call.

    Backward in torch: ``d||a||/da = a / ||a||`` (0 at ``a = 0``, as torch's norm does).
    """

    @staticmethod
    def forward(ctx, layout: AdapterLayout, n_layers: int, *factors):
        As, Bs = list(factors[:n_layers]), list(factors[n_layers:])
        out, na, nb = _C.component_norms(As, Bs, layout.offsets_tensor(As[0].device), layout.max_rank)
        ctx.layout, ctx.n_layers = layout, n_layers
        ctx.save_for_backward(na, nb, *factors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        na, nb, *factors = ctx.saved_tensors
        layout, L = ctx.layout, ctx.n_layers
        dev = na.device
        g_rows = g[:, layout.row_adapter(dev), layout.row_component(dev)]  # [L, R]
        grads = []
        for i, t in enumerate(factors):
            if not ctx.needs_input_grad[2 + i]:
                grads.append(None)
                continue
            l, is_A = i % L, i < L
            own, other = (na[l], nb[l]) if is_A else (nb[l], na[l])
            coef = torch.where(own > 0, g_rows[l] * other / own, torch.zeros_like(own))
            grads.append((coef.unsqueeze(1) * t.to(coef.dtype)).to(t.dtype))
        return (None, None, *grads)


def component_norms_impl(As: list, Bs: list, layout: AdapterLayout) -> torch.Tensor:
    """``[L, K, r_max]`` (float32; float64 for float64 inputs), differentiable; one call for all layers."""
    parts = [_ComponentNorms.apply(layout, len(a), *a, *b) for a, b in _same_dtype_runs(As, Bs)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def delta_fro_norms_impl(As: list, Bs: list, layout: AdapterLayout, scaling) -> torch.Tensor:
    """``[L, K]`` ``|s_k| ||B_k^T A_k||_F`` from the Gram identity (not differentiable)."""
    parts = [
        _C.delta_fro_sq(a, b, layout.offsets_tensor(a[0].device), layout.max_rank) for a, b in _same_dtype_runs(As, Bs)
    ]
    sq = parts[0] if len(parts) == 1 else torch.cat(parts)  # [L, K] fp32/fp64
    if isinstance(scaling, torch.Tensor):
        s = scaling.to(device=sq.device, dtype=sq.dtype).abs()
    else:
        s = abs(float(scaling))
    return sq.clamp_min(0).sqrt() * s


def weighted_aggregate_impl(As: list, Bs: list, layout: AdapterLayout, weights: torch.Tensor, out_rank: int):
    """Per layer ``(sum_k w_k pad(A_k), sum_k w_k pad(B_k))`` with ``out_rank`` rows, input dtype;
    all A and B of one dtype in one call."""
    outA, outB = [], []
    for a, b in _same_dtype_runs(As, Bs):
        outs = _C.weighted_aggregate(a + b, layout.offsets_tensor(a[0].device), weights.to(a[0].device), out_rank)
        outA += outs[: len(a)]
        outB += outs[len(a) :]
    return outA, outB


IMPLS = {
    "lora_delta": lora_delta_impl,
    "lora_linear": lora_linear_impl,
    "component_norms": component_norms_impl,
    "delta_fro_norms": delta_fro_norms_impl,
    "weighted_aggregate": weighted_aggregate_impl,
    "truncate": reference.truncate_impl,
}
