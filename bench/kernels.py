"""Microbenchmarks of every hetlora_kernels op on every backend present, against baselines.

Methods timed in one run, on the same inputs:

* backends found at run time with ``backend_status``: ``torch`` (always), ``triton``,
  ``cuda`` (on CPU tensors: the C++ kernels of the same extension).  Triton under
  ``TRITON_INTERPRET=1`` on a CPU is an interpreter, not a timing: skipped unless
  ``--interpreted``.
* ``loop``: a per-adapter Python loop of torch matmuls on each adapter's token slice.
* ``bmm_padded``: adapters stored zero-padded to ``r_pad`` (``r_max`` rounded up to a
  multiple of 8) as ``[K, r_pad, d]``, tokens viewed as ``[K, n, d]`` (every adapter has
  the same token count here, so no token padding is needed: the kindest form), two
  ``torch.bmm``.
* ``peft``: peft's mixed-adapter batch, ``model(x, adapter_names=[...])`` on a peft model
  with K adapters of the mixed ranks (``lora_linear`` only, since peft always adds the
  base output; peft refuses ``adapter_names`` in training mode, so it runs in eval mode
  and its backward is an ordinary autograd backward through that forward).
* ``grouped_mm``: ``torch._grouped_mm`` over the padded stores with per-adapter offsets,
  where the torch build has it and it accepts the device/dtype ("n/a" with the reason).

Counted bytes and flops (``es`` = element size; ``T`` tokens, every token routed;
``R_used = sum of r_k over adapters that own a token``; ``r(t)`` = rank of token t's adapter):

* ``lora_delta`` forward: bytes ``es * (T*d_in + R_used*(d_in + d_out) + T*d_out)``
  (read x and the used A/B rows once, write y); flops ``sum_t 2*r(t)*(d_in + d_out)``.
* ``lora_delta`` backward (x, A, B all need grads): bytes ``es * (T*d_out + 2*T*d_in +
  2*R_used*(d_in + d_out))`` (read dy and x, write dx; read the used A/B rows, write dA/dB;
  ``h`` [T, r] is negligible); flops twice the forward's (``g = dy B^T``, ``dx = g A``,
  ``dA = g^T x``, ``dB = h^T dy``).  ``fwd+bwd`` counts both.
* ``lora_linear`` adds the frozen base: forward bytes ``+ es*(d_out*d_in + d_out)``,
  flops ``+ 2*T*d_in*d_out``; backward (dx only, W frozen) bytes ``+ es*d_out*d_in``,
  flops ``+ 2*T*d_in*d_out``.
* ``component_norms`` (per layer): bytes ``es*R*(d_in+d_out) + 4*K*r_max``, flops
  ``2*R*(d_in+d_out)``.  ``delta_fro_norms``: bytes ``es*R*(d_in+d_out) + 4*K``, flops
  ``sum_k 2*r_k^2*(d_in+d_out)`` (two Gram matrices).  ``weighted_aggregate``: bytes
  ``es*(R + r_out)*(d_in+d_out)``, flops ``2*R*(d_in+d_out)``.  ``truncate``: bytes
  ``es*(r_max + R)*(d_in+d_out)`` (read the global rows once, write the packed copy), 0 flops.
  Lists of L layers multiply all of these by L.  Index tensors are not counted (< 1%).

The roofline floor is ``max(bytes / bandwidth, flops / matmul rate)`` with the measured
ceilings of the device (a large copy and a large matmul, timed at the start of the run)
or, where one is missing, the datasheet table in `bench.common`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hetlora_kernels as hk
from bench import common as C

BASELINES = ("loop", "bmm_padded", "peft", "grouped_mm")
LORA_OPS = ("lora_delta", "lora_linear")
SERVER_OPS = ("component_norms", "delta_fro_norms", "weighted_aggregate", "truncate")
ARR_SHORT = {"grouped": "grp", "interleaved": "int"}
ALPHA = 16.0


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
@dataclass
class Preset:
    """A sweep: the main grid (first mix, first dtype) plus an extra grid over every mix/dtype."""

    Ts: list[int]
    ds: list[int]
    Ks: list[int]
    mixes: list[str]
    dtypes: list[str]
    extra_Ts: list[int]
    extra_ds: list[int]
    extra_Ks: list[int]
    server: list[tuple[int, int, int]]  # (K, d, L)
    server_dtypes: list[str]
    warmup: int = 3
    reps: int = 30
    min_reps: int = 3
    method_budget_s: float = 0.5
    budget_s: float = 600.0
    # a call slower than this at its second warm-up gets `common.SLOW_REPS` samples: see `common.time_fn`
    slow_call_s: float | None = None
    modes: list[str] = field(default_factory=lambda: ["fwd", "fwd+bwd"])
    # token arrangements of the main grid at the largest d (K > 1): "grouped" (each adapter's
    # tokens contiguous, as a simulation's concatenated mini-batches) and "interleaved" (tokens
    # in random adapter order, as a server mixing requests)
    arrangements: list[str] = field(default_factory=lambda: ["grouped", "interleaved"])
    # the points of every block that `sweep` runs in its first pass (the main block runs whole)
    cover_Ts: list[int] = field(default_factory=list)
    cover_Ks: list[int] = field(default_factory=list)


PRESETS: dict[str, Preset] = {
    # tiny shapes, 1-2 reps: proves the script works (CI); not a measurement
    "smoke": Preset(Ts=[64, 128], ds=[32], Ks=[1, 4], mixes=["mixed", "skewed"], dtypes=["fp32"],
                    extra_Ts=[64], extra_ds=[32], extra_Ks=[8], server=[(4, 32, 2)], server_dtypes=["fp32"],
                    warmup=1, reps=2, min_reps=1, method_budget_s=0.05, budget_s=90.0),
    # moderate CPU sweep: a few minutes on 2 cores
    # K = 32 at T = 4096, d = 1024 is the C++-vs-torch goal shape of the csrc issue
    "cpu": Preset(Ts=[256, 1024, 4096], ds=[1024], Ks=[1, 8, 32, 64], mixes=["mixed", "uniform", "skewed"],
                  dtypes=["fp32"], extra_Ts=[1024], extra_ds=[1024], extra_Ks=[64],
                  server=[(8, 1024, 1), (64, 1024, 1), (64, 384, 12)], server_dtypes=["fp32"],
                  warmup=2, reps=5, min_reps=3, method_budget_s=1.0, budget_s=270.0),
    # the full GPU sweep (bench/gpu_all.sh)
    "gpu": Preset(Ts=[256, 1024, 4096, 16384], ds=[1024, 2048, 4096], Ks=[1, 8, 64, 256],
                  mixes=["mixed", "uniform", "skewed"], dtypes=["bf16", "fp16"],
                  extra_Ts=[1024, 16384], extra_ds=[4096], extra_Ks=[8, 64, 256],
                  server=[(K, d, L) for K in (8, 64, 256) for d in (1024, 4096) for L in (1, 12)],
                  server_dtypes=["fp32", "bf16"],
                  warmup=3, reps=30, min_reps=5, method_budget_s=0.1, budget_s=200.0, slow_call_s=0.02,
                  cover_Ts=[1024, 16384], cover_Ks=[8, 256]),
}


def make_ranks(K: int, mix: str, seed: int = 0) -> list[int]:
    """``uniform``: all 16.  ``mixed``: uniform random in [4, 64] (odd ranks included).
    ``skewed``: rank 4 except every 8th client (and client 0) at 64."""
    if mix == "uniform":
        return [16] * K
    if mix == "mixed":
        rng = random.Random(seed * 7919 + K)
        return [rng.randint(4, 64) for _ in range(K)]
    if mix == "skewed":
        return [64 if k % 8 == 0 else 4 for k in range(K)]
    raise ValueError(f"unknown rank mix {mix!r}")


# ------------------------------------------------------------------------------------------
# counting
# ------------------------------------------------------------------------------------------
def lora_counts(op: str, mode: str, T: int, d_in: int, d_out: int, ranks: list[int], counts: list[int],
                es: int) -> tuple[float, float]:
    """(bytes, flops) of one call; see the module docstring for the formulas."""
    r_used = sum(r for r, c in zip(ranks, counts) if c > 0)
    tok_r = sum(r * c for r, c in zip(ranks, counts))
    f_fwd = 2.0 * tok_r * (d_in + d_out)
    b_fwd = es * (T * d_in + r_used * (d_in + d_out) + T * d_out)
    f_bwd = 2.0 * f_fwd
    b_bwd = es * (T * d_out + 2 * T * d_in + 2 * r_used * (d_in + d_out))
    if op == "lora_linear":
        f_fwd += 2.0 * T * d_in * d_out
        b_fwd += es * (d_out * d_in + d_out)
        f_bwd += 2.0 * T * d_in * d_out
        b_bwd += es * d_out * d_in
    if mode == "fwd":
        return b_fwd, f_fwd
    return b_fwd + b_bwd, f_fwd + f_bwd


def server_counts(op: str, d: int, L: int, ranks: list[int], es: int) -> tuple[float, float]:
    R, K, r_max = sum(ranks), len(ranks), max(ranks)
    dd = 2 * d
    if op == "component_norms":
        b, f = es * R * dd + 4 * K * r_max, 2.0 * R * dd
    elif op == "delta_fro_norms":
        b, f = es * R * dd + 4 * K, sum(2.0 * r * r * dd for r in ranks)
    elif op == "weighted_aggregate":
        b, f = es * (R + r_max) * dd, 2.0 * R * dd
    else:  # truncate
        b, f = es * (r_max + R) * dd, 0.0
    return L * b, L * f


# ------------------------------------------------------------------------------------------
# backends and baselines
# ------------------------------------------------------------------------------------------
def discover_backends(device: torch.device, interpreted: bool) -> tuple[list[str], dict[str, str]]:
    """Backends that can run on ``device`` now, and the reason for each one that cannot."""
    ok, why = [], {}
    for name in ("torch", "triton", "cuda"):
        try:
            avail, reason = hk.backend_status(name, device)
        except Exception as e:  # a backend half-written by someone else must not stop the run
            avail, reason = False, f"{type(e).__name__}: {e}"
        if avail and name == "triton" and device.type == "cpu" and not interpreted:
            avail, reason = False, "TRITON_INTERPRET on a CPU is an interpreter, not a timing (use --interpreted)"
        if avail:
            ok.append(name)
        else:
            why[name] = reason
    return ok, why


def grouped_mm_probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``torch._grouped_mm`` runs (forward and backward) here; else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(32, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 16, 64, device=device, dtype=dtype).requires_grad_(True)
        offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
        y = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
        y.backward(torch.randn_like(y))  # (a .sum() grad is an expanded view, which it rejects)
        ref = a[:16].float() @ b[0].float().t()
        err = float((y[:16].detach().float() - ref.detach()).norm() / ref.detach().norm())
        if not err < 5e-2:
            return f"torch._grouped_mm gave a wrong result here (rel err {err:.2g})"
    except Exception as e:
        return f"torch._grouped_mm raised on {device.type}/{C.dtype_name(dtype)}: {type(e).__name__}: {str(e)[:160]}"
    return None


class _Wrap(nn.Module):
    """The one linear layer that peft adapts in the ``peft`` baseline."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def build_peft(W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
               layout: hk.AdapterLayout) -> nn.Module:
    """A peft model over ``nn.Linear(W, bias)`` with adapter ``a{k}`` = our adapter k (same weights)."""
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model

    d_out, d_in = W.shape
    lin = nn.Linear(d_in, d_out, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(W.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    logging.getLogger("peft").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfgs = [LoraConfig(r=r, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=0.0,
                           init_lora_weights=False) for r in layout.ranks]
        model = get_peft_model(_Wrap(lin), cfgs[0], adapter_name="a0")
        for k in range(1, layout.num_adapters):
            model.add_adapter(f"a{k}", cfgs[k])
    layer = model.base_model.model.lin
    with torch.no_grad():
        for k in range(layout.num_adapters):
            rows = layout.rows(k)
            la, lb = layer.lora_A[f"a{k}"], layer.lora_B[f"a{k}"]
            la.weight = nn.Parameter(A.detach()[rows].clone())
            lb.weight = nn.Parameter(B.detach()[rows].t().contiguous())
    model.eval()  # peft refuses adapter_names= in training mode
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


# the last peft model built, by (d_in, d_out, bias, ranks, dtype, device): building one with
# 256 adapters takes seconds of host time, and the sweep times the same adapters at every T
_PEFT_CACHE: dict[tuple, nn.Module] = {}


def peft_for(W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
             layout: hk.AdapterLayout) -> nn.Module:
    """`build_peft`, or the last model built for the same shapes with these weights copied in."""
    key = (tuple(W.shape), bias is not None, tuple(layout.ranks), W.dtype, str(W.device))
    model = _PEFT_CACHE.get(key)
    if model is None:
        _PEFT_CACHE.clear()  # one model at a time: the sweep runs each key's Ts back to back
        model = _PEFT_CACHE[key] = build_peft(W, bias, A, B, layout)
        return model
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        if bias is not None:
            layer.base_layer.bias.copy_(bias)
        for k in range(layout.num_adapters):
            rows = layout.rows(k)
            layer.lora_A[f"a{k}"].weight.copy_(A[rows])
            layer.lora_B[f"a{k}"].weight.copy_(B[rows].t())
    model.zero_grad(set_to_none=True)
    return model


@dataclass
class LoraCase:
    """One input set of a LoRA-op config; all tensors on the device in the config's dtype."""

    x: torch.Tensor  # [T, d_in], requires grad
    W: torch.Tensor  # [d_out, d_in] frozen
    bias: torch.Tensor  # [d_out]
    A: torch.Tensor  # [R, d_in] packed, requires grad
    B: torch.Tensor  # [R, d_out]
    A_pad: torch.Tensor  # [K, r_pad, d_in] zero rows past r_k, requires grad
    B_pad: torch.Tensor  # [K, r_pad, d_out]
    dy: torch.Tensor  # [T, d_out]

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A, self.B, self.A_pad, self.B_pad]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.W, self.A, self.B, self.A_pad, self.B_pad,
                                                           self.dy))


def make_case(T: int, d_in: int, d_out: int, layout: hk.AdapterLayout, r_pad: int, dtype: torch.dtype,
              device: torch.device, gen: torch.Generator) -> LoraCase:
    R, K = layout.total_rank, layout.num_adapters

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        # drawn on the device (gen lives there): host draws of [16384, 4096] would dominate set-up
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = rnd(T, d_in)
    W = rnd(d_out, d_in, scale=d_in**-0.5)
    bias = rnd(d_out, scale=0.1)
    # B is not zero (peft's init) so that the delta is a real signal to check and time
    A = rnd(R, d_in, scale=d_in**-0.5)
    B = rnd(R, d_out, scale=0.1)
    A_pad = torch.zeros(K, r_pad, d_in, device=device, dtype=dtype)
    B_pad = torch.zeros(K, r_pad, d_out, device=device, dtype=dtype)
    for k in range(K):
        rows = layout.rows(k)
        A_pad[k, : layout.ranks[k]] = A[rows]
        B_pad[k, : layout.ranks[k]] = B[rows]
    dy = rnd(T, d_out)
    for t in (x, A, B, A_pad, B_pad):
        t.requires_grad_(True)
    return LoraCase(x, W, bias, A, B, A_pad, B_pad, dy)


def lora_methods(op: str, layout: hk.AdapterLayout, groups: hk.TokenGroups, n_per: int, scales: list[float],
                 backends: list[str], gmm_reason: str | None, peft_model: nn.Module | None,
                 peft_reason: str | None, L_seq: int, device: torch.device, dtype: torch.dtype,
                 perm: torch.Tensor | None = None) -> dict[str, Callable[[LoraCase], torch.Tensor] | str]:
    """Method name -> forward function of a `LoraCase` (``[T, d_out]``), or the reason it is n/a.

    With interleaved tokens (``perm``, see `token_ids`) the loop, bmm and grouped-mm baselines
    gather x into grouped order first and gather the result back (what a user of those would
    write); peft gets one length-1 sequence per token with its adapter name.
    """
    K = layout.num_adapters
    s_dev = torch.tensor(scales, device=device, dtype=dtype)
    s_tok = s_dev.repeat_interleave(n_per).unsqueeze(1)  # [T, 1]: token t's adapter scaling
    g_offs = torch.arange(1, K + 1, device=device, dtype=torch.int32) * n_per
    linear = op == "lora_linear"
    out: dict[str, Any] = {}

    def base(c: LoraCase) -> torch.Tensor | None:
        return torch.nn.functional.linear(c.x, c.W, c.bias) if linear else None

    inv = None if perm is None else perm.argsort()

    def add(b: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if perm is not None:
            y = y.index_select(0, perm)  # grouped order -> the tokens' own order
        return y if b is None else b + y

    def grouped_x(c: LoraCase) -> torch.Tensor:
        return c.x if inv is None else c.x.index_select(0, inv)

    for name in backends:
        def f(c: LoraCase, name: str = name) -> torch.Tensor:
            with hk.use_backend(name):
                if linear:
                    return hk.lora_linear(c.x, c.W, c.bias, c.A, c.B, layout, groups, scales)
                return hk.lora_delta(c.x, c.A, c.B, layout, groups, scales)

        out[name] = f

    ranks = list(layout.ranks)

    def loop(c: LoraCase) -> torch.Tensor:
        # split, not slicing: each slice's backward would allocate a full-size gradient
        parts = [((xs @ a.t()) * s) @ b
                 for xs, a, b, s in zip(grouped_x(c).split(n_per), c.A.split(ranks), c.B.split(ranks), scales)]
        return add(base(c), torch.cat(parts))

    def bmm(c: LoraCase) -> torch.Tensor:
        xp = grouped_x(c).view(K, n_per, c.x.shape[1])
        h = torch.bmm(xp, c.A_pad.transpose(1, 2)) * s_dev.view(K, 1, 1)
        return add(base(c), torch.bmm(h, c.B_pad).view(K * n_per, -1))

    out["loop"] = loop
    out["bmm_padded"] = bmm
    if linear and peft_model is not None:
        if perm is None:
            names = [f"a{k}" for k in range(K) for _ in range(n_per // L_seq)]
        else:  # peft routes whole sequences: one token per sequence
            names = [f"a{k}" for k in groups.adapter_ids.tolist()]
            L_seq = 1

        def peft_fn(c: LoraCase) -> torch.Tensor:
            y = peft_model(c.x.view(-1, L_seq, c.x.shape[1]), adapter_names=names)
            return y.reshape(-1, y.shape[-1])

        out["peft"] = peft_fn
    else:
        out["peft"] = peft_reason or "peft always adds the base output: see lora_linear"
    if gmm_reason is None:
        def gmm(c: LoraCase) -> torch.Tensor:
            h = torch._grouped_mm(grouped_x(c), c.A_pad.transpose(1, 2), offs=g_offs) * s_tok
            return add(base(c), torch._grouped_mm(h, c.B_pad, offs=g_offs))

        out["grouped_mm"] = gmm
    else:
        out["grouped_mm"] = gmm_reason
    return out


# ------------------------------------------------------------------------------------------
# one config
# ------------------------------------------------------------------------------------------
def _err_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _finish_row(row: dict[str, Any], nbytes: float, flops: float, dtype: torch.dtype,
                peaks: dict[str, float] | None) -> None:
    t = row.get("median_ms")
    row["bytes"], row["flops"] = nbytes, flops
    floor = C.roofline_floor_s(nbytes, flops, dtype, peaks)
    row["floor_ms"] = floor * 1e3 if floor is not None else None
    if t:
        row["gbps"] = nbytes / (t / 1e3) / 1e9
        row["tflops"] = flops / (t / 1e3) / 1e12
        row["roofline_frac"] = (floor * 1e3 / t) if floor is not None else None


def _speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup`` (baseline ms / this ms) and ``mem_vs_bmm`` for the rows of one (config, op, mode)."""
    by = {r["method"]: r for r in rows}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        r["speedup"] = {b: by[b]["median_ms"] / r["median_ms"] for b in BASELINES
                        if b in by and by[b].get("median_ms") and b != r["method"]}
        # the other backends against the torch backend (the reference path): the csrc issue's ratio
        t = by.get("torch", {}).get("median_ms")
        if r["kind"] == "backend" and r["method"] != "torch" and t:
            r["vs_torch"] = t / r["median_ms"]
        pb = by.get("bmm_padded", {}).get("peak_bytes")
        if pb and r.get("peak_bytes") is not None:
            r["mem_vs_bmm"] = r["peak_bytes"] / pb


def token_ids(K: int, n_per: int, arrangement: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [T], perm)``: adapter of each token, and for ``interleaved`` the permutation
    ``perm`` with ``ids = grouped_ids[perm]`` (None for ``grouped``: ``perm`` is the identity)."""
    grouped = torch.arange(K).repeat_interleave(n_per)
    if arrangement == "grouped":
        return grouped.to(device), None
    if arrangement != "interleaved":
        raise ValueError(f"unknown token arrangement {arrangement!r}")
    perm = torch.randperm(K * n_per, generator=torch.Generator().manual_seed(K * 7919 + n_per))
    return grouped[perm].to(device), perm.to(device)


def bench_lora_config(T: int, d: int, K: int, mix: str, dtype: torch.dtype, device: torch.device,
                      backends: list[str], peaks: dict[str, float] | None, pre: Preset, modes: list[str],
                      no_peft: str | None, gmm_reason: str | None, l2_bytes: float,
                      arrangement: str = "grouped") -> list[dict[str, Any]]:
    """Time both LoRA ops in every mode for one shape; returns one row per (op, mode, method)."""
    ranks = make_ranks(K, mix)
    layout = hk.AdapterLayout(ranks)
    n_per = T // K
    T = n_per * K
    d_in = d_out = d
    r_pad = -(-layout.max_rank // 8) * 8
    ids, perm = token_ids(K, n_per, arrangement, device)
    groups = hk.TokenGroups.from_adapter_ids(ids, K)
    scales = [ALPHA / r for r in ranks]
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{T},{d},{K},{mix}".encode()))
    case0 = make_case(T, d_in, d_out, layout, r_pad, dtype, device, gen)
    if device.type == "cuda":
        n_sets = max(2, min(16, math.ceil(4 * l2_bytes / max(1, case0.nbytes()))))
    else:
        n_sets = 1
    cases = [case0] + [make_case(T, d_in, d_out, layout, r_pad, dtype, device, gen) for _ in range(n_sets - 1)]
    L_seq = min(64, n_per)
    peft_model, peft_reason = None, no_peft
    if no_peft is None:
        try:
            peft_model = peft_for(case0.W, case0.bias, case0.A, case0.B, layout)
        except Exception as e:
            peft_reason = f"peft model build failed: {_err_reason(e)}"
    common = {"T": T, "d_in": d_in, "d_out": d_out, "K": K, "mix": mix, "arrangement": arrangement,
              "dtype": C.dtype_name(dtype),
              "r_max": layout.max_rank, "R": layout.total_rank, "r_pad": r_pad, "n_sets": n_sets}
    rows: list[dict[str, Any]] = []
    for op in LORA_OPS:
        methods = lora_methods(op, layout, groups, n_per, scales, backends, gmm_reason, peft_model, peft_reason,
                               L_seq, device, dtype, perm)
        # reference: the loop in float32 on input set 0 (float64 is slow on GPUs and not needed
        # to rank errors of 1e-3 and above)
        with torch.no_grad():
            c = case0
            xs, As, Bs = c.x.float(), c.A.float(), c.B.float()
            xg = xs if perm is None else xs[perm.argsort()]  # grouped order: token perm[i] at i
            ref = torch.cat([((xg[k * n_per:(k + 1) * n_per] @ As[layout.rows(k)].t()) * scales[k])
                             @ Bs[layout.rows(k)] for k in range(K)])
            if perm is not None:
                ref = ref[perm]
            if op == "lora_linear":
                ref = ref + torch.nn.functional.linear(xs, c.W.float(), c.bias.float())
            ref_norm = float(ref.norm())
        for mode in modes:
            nbytes, flops = lora_counts(op, mode, T, d_in, d_out, ranks, [n_per] * K, case0.x.element_size())
            mrows = []
            for mname, fn in methods.items():
                row = {"op": op, "mode": mode, "method": mname,
                       "kind": "backend" if mname in backends else "baseline", **common}
                if isinstance(fn, str):
                    row.update(status="n/a", reason=fn)
                    mrows.append(row)
                    continue
                try:
                    row.update(_time_method(fn, cases, mode, device, pre, peft_model if mname == "peft" else None))
                    if mode == "fwd":
                        with torch.no_grad():
                            y = fn(case0).float()
                        row["rel_err"] = float((y - ref).norm()) / ref_norm if ref_norm else None
                    row["status"] = "ok"
                except NotImplementedError as e:
                    row.update(status="n/a", reason=_err_reason(e))
                except torch.cuda.OutOfMemoryError as e:
                    row.update(status="oom", reason=_err_reason(e))
                    torch.cuda.empty_cache()
                except Exception as e:
                    row.update(status="error", reason=_err_reason(e))
                _finish_row(row, nbytes, flops, dtype, peaks)
                mrows.append(row)
            _speedups(mrows)
            rows.extend(mrows)
    del cases, peft_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _time_method(fn: Callable[[LoraCase], torch.Tensor], cases: list[LoraCase], mode: str, device: torch.device,
                 pre: Preset, peft_model: nn.Module | None) -> dict[str, Any]:
    if mode == "fwd":
        def mk(c: LoraCase) -> Callable[[], Any]:
            def call() -> None:
                with torch.no_grad():
                    fn(c)
            return call
        before = None
    else:
        def mk(c: LoraCase) -> Callable[[], Any]:
            def call() -> None:
                fn(c).backward(c.dy)
            return call

        def before() -> None:
            for c in cases:
                for t in c.leaves():
                    t.grad = None
            if peft_model is not None:
                peft_model.zero_grad(set_to_none=True)
    calls = [mk(c) for c in cases]
    r = C.time_fn(calls, device, warmup=pre.warmup, reps=pre.reps, min_reps=pre.min_reps,
                  budget_s=pre.method_budget_s, before=before, slow_s=pre.slow_call_s, peak=True)
    out = {"median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3, "p20_ms": r["p20_s"] * 1e3,
           "p80_ms": r["p80_s"] * 1e3, "reps": r["reps"], "peak_bytes": r["peak_bytes"]}
    if out["peak_bytes"] is None:  # off the GPU (or no timed call): one call of its own
        if before:
            before()
        out["peak_bytes"] = C.peak_memory(calls[0], device)
    return out


# ------------------------------------------------------------------------------------------
# server ops
# ------------------------------------------------------------------------------------------
def server_methods(op: str, layout: hk.AdapterLayout, L: int, scales: list[float], backends: list[str]
                   ) -> dict[str, Callable[[dict], Any] | str]:
    K, offs, ranks = layout.num_adapters, layout.offsets, layout.ranks
    out: dict[str, Any] = {}

    def arg(v: list) -> Any:
        return v if L > 1 else v[0]

    for name in backends:
        def f(s: dict, name: str = name) -> Any:
            with hk.use_backend(name):
                if op == "component_norms":
                    return hk.component_norms(arg(s["A"]), arg(s["B"]), layout)
                if op == "delta_fro_norms":
                    return hk.delta_fro_norms(arg(s["A"]), arg(s["B"]), layout, scales)
                if op == "weighted_aggregate":
                    return hk.weighted_aggregate(arg(s["A"]), arg(s["B"]), layout, s["w"])
                return hk.truncate(arg(s["Ag"]), arg(s["Bg"]), layout)

        out[name] = f

    def loop(s: dict) -> Any:
        res = []
        for li in range(L):
            A, B = s["A"][li], s["B"][li]
            if op == "component_norms":
                n = torch.zeros(K, layout.max_rank, device=A.device)
                for k in range(K):
                    a, b = A[offs[k]:offs[k + 1]].float(), B[offs[k]:offs[k + 1]].float()
                    n[k, : ranks[k]] = a.norm(dim=1) * b.norm(dim=1)
                res.append(n)
            elif op == "delta_fro_norms":
                # the naive way: materialise each d_out x d_in delta
                res.append(torch.stack([
                    torch.linalg.matrix_norm(B[offs[k]:offs[k + 1]].t().float() @ A[offs[k]:offs[k + 1]].float())
                    * abs(scales[k]) for k in range(K)]))
            elif op == "weighted_aggregate":
                ag = torch.zeros(layout.max_rank, A.shape[1], device=A.device, dtype=torch.float32)
                bg = torch.zeros(layout.max_rank, B.shape[1], device=A.device, dtype=torch.float32)
                for k in range(K):
                    ag[: ranks[k]] += s["w_list"][k] * A[offs[k]:offs[k + 1]].float()
                    bg[: ranks[k]] += s["w_list"][k] * B[offs[k]:offs[k + 1]].float()
                res.append((ag, bg))
            else:
                Ag, Bg = s["Ag"][li], s["Bg"][li]
                res.append((torch.cat([Ag[: r] for r in ranks]), torch.cat([Bg[: r] for r in ranks])))
        return res

    def padded(s: dict) -> Any:
        res = []
        for li in range(L):
            Ap, Bp = s["A_pad"][li].float(), s["B_pad"][li].float()
            if op == "component_norms":
                res.append(Ap.norm(dim=2) * Bp.norm(dim=2))
            elif op == "delta_fro_norms":
                ga = torch.bmm(Ap, Ap.transpose(1, 2))
                gb = torch.bmm(Bp, Bp.transpose(1, 2))
                res.append((ga * gb).sum((1, 2)).clamp_min(0).sqrt() * s["s_abs"])
            else:
                res.append((torch.einsum("k,krd->rd", s["w"], Ap), torch.einsum("k,krd->rd", s["w"], Bp)))
        return res

    out["loop"] = loop
    out["bmm_padded"] = padded if op != "truncate" else "no padded formulation: truncate's output is packed"
    out["peft"] = "peft has no server-side op"
    out["grouped_mm"] = "not a grouped matmul"
    return out


def bench_server_config(K: int, d: int, L: int, mix: str, dtype: torch.dtype, device: torch.device,
                        backends: list[str], peaks: dict[str, float] | None, pre: Preset) -> list[dict[str, Any]]:
    ranks = make_ranks(K, mix)
    layout = hk.AdapterLayout(ranks)
    R, r_max = layout.total_rank, layout.max_rank
    r_pad = -(-r_max // 8) * 8
    gen = torch.Generator().manual_seed(K * 1000 + d + L)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(device=device, dtype=dtype)

    A = [rnd(R, d) for _ in range(L)]
    B = [rnd(R, d) for _ in range(L)]
    A_pad, B_pad = [], []
    for li in range(L):
        ap = torch.zeros(K, r_pad, d, device=device, dtype=dtype)
        bp = torch.zeros(K, r_pad, d, device=device, dtype=dtype)
        for k in range(K):
            ap[k, : ranks[k]] = A[li][layout.rows(k)]
            bp[k, : ranks[k]] = B[li][layout.rows(k)]
        A_pad.append(ap)
        B_pad.append(bp)
    w = torch.rand(K, generator=gen)
    w = (w / w.sum()).to(device)
    scales = [ALPHA / r for r in ranks]
    s = {"A": A, "B": B, "A_pad": A_pad, "B_pad": B_pad, "w": w, "w_list": w.tolist(),
         "s_abs": torch.tensor([abs(x) for x in scales], device=device),
         "Ag": [rnd(r_max, d) for _ in range(L)], "Bg": [rnd(r_max, d) for _ in range(L)]}
    common = {"K": K, "d_in": d, "d_out": d, "L": L, "mix": mix, "dtype": C.dtype_name(dtype), "r_max": r_max,
              "R": R, "T": None}
    rows: list[dict[str, Any]] = []
    for op in SERVER_OPS:
        nbytes, flops = server_counts(op, d, L, ranks, A[0].element_size())
        mrows = []
        for mname, fn in server_methods(op, layout, L, scales, backends).items():
            row = {"op": op, "mode": "fwd", "method": mname, "kind": "backend" if mname in backends else "baseline",
                   **common}
            if isinstance(fn, str):
                row.update(status="n/a", reason=fn)
            else:
                try:
                    def call(fn: Callable = fn) -> None:
                        with torch.no_grad():
                            fn(s)
                    r = C.time_fn([call], device, warmup=pre.warmup, reps=pre.reps, min_reps=pre.min_reps,
                                  budget_s=pre.method_budget_s, slow_s=pre.slow_call_s, peak=True)
                    peak = r["peak_bytes"] if r["peak_bytes"] is not None else C.peak_memory(call, device)
                    row.update(median_ms=r["median_s"] * 1e3, min_ms=r["min_s"] * 1e3, p20_ms=r["p20_s"] * 1e3,
                               p80_ms=r["p80_s"] * 1e3, reps=r["reps"], peak_bytes=peak, status="ok")
                except NotImplementedError as e:
                    row.update(status="n/a", reason=_err_reason(e))
                except Exception as e:
                    row.update(status="error", reason=_err_reason(e))
            _finish_row(row, nbytes, flops, dtype, peaks)
            mrows.append(row)
        _speedups(mrows)
        rows.extend(mrows)
    return rows


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def sweep(pre: Preset) -> list[tuple]:
    """Jobs in priority order, so that a run cut short by its budget still covers every axis.

    The blocks, in order: the server ops (first dtype); the main grid (first mix and dtype,
    grouped tokens) at the largest d; the other token arrangements there; the main grid at the
    other d; the extra grid over every mix and dtype; the server ops in the other dtypes.
    Two passes over them: the first runs the main block whole, the server ops at the largest
    d, and of every other block only its cover points (T in ``cover_Ts`` and K in ``cover_Ks``),
    taking the blocks in turn (each block's first point, then each block's second, ...); the
    second runs what is left, block by block.  Within a block K is the outer loop, so the
    configs that share adapters (and a peft model, see `peft_for`) run back to back.
    LoRA jobs are ``("lora", T, d, K, mix, dtype, arrangement)`` with ``T >= K``; server jobs
    ``("server", K, d, L, dtype)``.
    """
    def lora_ok(c: tuple) -> bool:
        # fewer tokens than adapters; or K = 1, where every mix and arrangement is the same
        return not (c[1] < c[3] or (c[3] == 1 and (c[4] != pre.mixes[0] or c[6] != "grouped")))

    ds = sorted(pre.ds, reverse=True)
    m0, dt0 = pre.mixes[0], pre.dtypes[0]
    main = [("lora", T, ds[0], K, m0, dt0, "grouped") for K in pre.Ks for T in pre.Ts]
    blocks = [[("lora", T, ds[0], K, m0, dt0, arr) for K in pre.Ks for T in pre.Ts] for arr in pre.arrangements[1:]]
    blocks += [[("lora", T, d, K, m0, dt0, "grouped") for K in pre.Ks for T in pre.Ts] for d in ds[1:]]
    blocks += [[("lora", T, d, K, mix, dt, "grouped") for d in pre.extra_ds for K in pre.extra_Ks
                for T in pre.extra_Ts] for dt in pre.dtypes for mix in pre.mixes]
    server = [("server", K, d, L, pre.server_dtypes[0]) for K, d, L in pre.server]
    server_rest = [("server", K, d, L, dt) for dt in pre.server_dtypes[1:] for K, d, L in pre.server]
    d_server = max((d for _, d, _ in pre.server), default=0)

    def cover(c: tuple) -> bool:
        if c[0] == "server":
            return c[2] == d_server
        return c[1] in pre.cover_Ts and c[3] in pre.cover_Ks

    first = [c for c in server if cover(c)] + main
    # the other blocks' cover points round-robin: one point of every block before a second of
    # any (the H100 lend's first pass was cut inside the other d's, before any fp16 or rank mix)
    covers = [[c for c in b if cover(c)] for b in blocks + [server_rest]]
    first += [c for group in itertools.zip_longest(*covers) for c in group if c is not None]
    second = [c for c in server if not cover(c)]
    second += [c for b in blocks + [server_rest] for c in b if not cover(c)]
    out: list[tuple] = []
    seen = set()
    for c in first + second:
        if c in seen or (c[0] == "lora" and not lora_ok(c)):
            continue
        seen.add(c)
        out.append(c)
    return out


def run(args: argparse.Namespace) -> Path:
    device, preset_name = C.resolve_run(args)
    pre = PRESETS[preset_name]
    if args.budget_s is not None:
        pre.budget_s = args.budget_s
    if args.reps is not None:
        pre.reps = args.reps
    out = C.out_dir(args.out, device)
    t_start = time.perf_counter()
    info = C.machine_info(device)
    backends, unavailable = discover_backends(device, args.interpreted)
    dtypes = [C.DTYPES[n] for n in pre.dtypes]
    sdtypes = [C.DTYPES[n] for n in pre.server_dtypes]
    table = C.table_peaks(device)
    measured = C.measure_ceilings(device, sorted(set(dtypes + sdtypes), key=str))
    peaks = dict(table or {})
    peaks.update(measured)  # measured ceilings win over the datasheet where both exist
    l2 = (table or {}).get("l2", 50e6)
    no_peft = None
    try:
        import peft  # noqa: F401
    except ImportError as e:
        no_peft = f"peft is not installed ({e})"
    gmm = {dt: grouped_mm_probe(device, dt) for dt in dtypes + sdtypes}
    result: dict[str, Any] = {
        "kind": "kernels", "preset": preset_name, "machine": info, "backends": backends,
        "backends_unavailable": unavailable, "peaks_table": table, "peaks_measured": measured, "peaks_used": peaks,
        "grouped_mm": {C.dtype_name(k): v or "ok" for k, v in gmm.items()}, "rows": [], "truncated": False,
        "memory_note": None if device.type == "cuda" else
        "peak memory on CPU: what torch allocates during one call, from the profiler's memory events "
        "(a library's own scratch, e.g. MKL's packing buffers, is not counted)",
    }
    print(f"[bench kernels] {info['device_name']}: preset {preset_name}, backends {backends}, "
          f"unavailable {list(unavailable)}, out {out}", flush=True)

    def over() -> bool:
        return time.perf_counter() - t_start > pre.budget_s

    for job in sweep(pre):
        if over():
            result["truncated"] = True
            break
        t0 = time.perf_counter()
        if job[0] == "lora":
            _, T, d, K, mix, dtn, arr = job
            dt = C.DTYPES[dtn]
            rows = bench_lora_config(T, d, K, mix, dt, device, backends, peaks, pre, pre.modes, no_peft, gmm[dt], l2,
                                     arr)
            _progress(f"lora T={T} d={d} K={K} {mix} {dtn} {arr}", rows, t0)
        else:
            _, K, d, L, dtn = job
            rows = bench_server_config(K, d, L, "mixed", C.DTYPES[dtn], device, backends, peaks, pre)
            _progress(f"server K={K} d={d} L={L} {dtn}", rows, t0)
        result["rows"].extend(rows)
        # after every job: a run killed by an outer timeout still leaves valid JSON and markdown
        C.save_results(result, out, "kernels", markdown)
    C.finish_info(info)
    result["wall_s"] = time.perf_counter() - t_start
    result = C.save_results(result, out, "kernels", markdown)
    try:
        plots(result, out)
    except Exception as e:  # plots are a convenience; the JSON and markdown are the record
        print(f"[bench kernels] plotting failed: {_err_reason(e)}", flush=True)
    print(f"[bench kernels] done in {result['wall_s']:.1f} s: {len(result['rows'])} rows"
          f"{' (truncated by the time budget)' if result['truncated'] else ''} -> {out}", flush=True)
    return out


def _progress(what: str, rows: list[dict[str, Any]], t0: float) -> None:
    last = rows[-1]
    best = {r["method"]: r.get("median_ms") for r in rows if r["mode"] == last["mode"] and r["op"] == last["op"]}
    s = ", ".join(f"{m} {v:.3g}" for m, v in best.items() if v)
    print(f"  {what} ({time.perf_counter() - t0:.1f} s) {rows[-1]['op']} {rows[-1]['mode']} ms: {s}", flush=True)


# ------------------------------------------------------------------------------------------
# markdown and plots
# ------------------------------------------------------------------------------------------
def _mib(b: Any) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _wall(res: dict[str, Any]) -> str:
    w = res.get("wall_s")
    return f"wall {w:.0f} s" if w is not None else "partial results (run in progress, or cut short)"


def markdown(res: dict[str, Any]) -> str:
    info = res["machine"]
    parts = [C.header_md(info, "hetlora kernel benchmarks")]
    trunc = "; **truncated by the time budget**" if res["truncated"] else ""
    parts.append(f"Preset `{res['preset']}`; backends timed: {', '.join(res['backends'])}; "
                 f"{_wall(res)}{trunc}.")
    if res["backends_unavailable"]:
        parts.append("Backends not timed: " + "; ".join(f"`{k}`: {v}" for k, v in res["backends_unavailable"].items()))
    pk = res["peaks_used"]
    parts.append("Roofline peaks used: " + ", ".join(
        f"{k} {v / 1e9:.0f} GB/s" if k == "bw" else f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in pk.items() if k != "l2")
        + " (measured where measured, else datasheet). " + (res.get("memory_note") or "")
        + (" On a CPU a fraction above 100% means the inputs sat in cache or the ceilings, measured on the "
           "same shared machine, came out low." if res["machine"].get("gpu") is None else ""))
    parts.append("`tokens`: `grp` = each adapter's tokens contiguous, `int` = interleaved in random adapter order. "
                 "`ms` = median, `min ms` = fastest rep (on a shared CPU the minimum is the steadier figure); "
                 "`×B` = speed-up over baseline B (B's median / this median), `×torch` = over the torch backend; "
                 "`mem/bmm` = peak bytes over the "
                 "padded-bmm baseline's; `err` = relative Frobenius error of the forward vs a float32 loop.\n")
    hdr = ["op", "mode", "T", "d", "K", "ranks", "tokens", "dtype", "method", "ms", "min ms", "GB/s", "TFLOP/s",
           "% roof", "×loop", "×bmm", "×peft", "×gmm", "×torch", "peak MiB", "mem/bmm", "err"]
    body = []
    notes: dict[str, set] = {}
    for r in res["rows"]:
        if r.get("status") != "ok":
            notes.setdefault(f"{r['method']}: {r.get('status')} — {r.get('reason')}", set()).add(r["op"])
            continue
        sp = r.get("speedup") or {}
        body.append([r["op"], r["mode"], C.fmt(r.get("T")) if r.get("T") else f"L={r.get('L')}", r["d_in"], r["K"],
                     r["mix"], ARR_SHORT.get(r.get("arrangement"), "–"), r["dtype"], r["method"],
                     C.fmt(r.get("median_ms")), C.fmt(r.get("min_ms")),
                     C.fmt(r.get("gbps")),
                     C.fmt(r.get("tflops")), C.fmt(100 * r["roofline_frac"], ".2g") if r.get("roofline_frac") else "–",
                     *(C.fmt(sp.get(b), ".2f") for b in BASELINES), C.fmt(r.get("vs_torch"), ".2f"),
                     _mib(r.get("peak_bytes")),
                     C.fmt(r.get("mem_vs_bmm"), ".2f"), C.fmt(r.get("rel_err"), ".1e")])
    parts.append(C.md_table(hdr, body))
    if notes:
        parts.append("\nNot measured:\n" + "\n".join(f"- {k} ({', '.join(sorted(v))})" for k, v in notes.items()))
    return "\n\n".join(parts) + "\n"


def _geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v))


def plots(res: dict[str, Any], out: Path) -> list[Path]:
    """``speedup_<op>_<mode>[_interleaved].png`` (one panel per baseline, one file per token
    arrangement) and ``roofline.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in res["rows"] if r.get("status") == "ok" and r.get("T")]
    backends = res["backends"]
    for op, mode, arr in itertools.product(LORA_OPS, ("fwd", "fwd+bwd"), ("grouped", "interleaved")):
        sel = [r for r in rows if r["op"] == op and r["mode"] == mode and r["method"] in backends
               and r.get("arrangement", "grouped") == arr]
        bases = [b for b in BASELINES if any(b in (r.get("speedup") or {}) for r in sel)]
        if not sel or not bases:
            continue
        fig, axes = plt.subplots(1, len(bases), figsize=(4.2 * len(bases), 3.6), squeeze=False)
        for ax, b in zip(axes[0], bases):
            series: dict[tuple[str, int], dict[int, list[float]]] = {}
            for r in sel:
                v = (r.get("speedup") or {}).get(b)
                if v:
                    series.setdefault((r["method"], r["K"]), {}).setdefault(r["T"], []).append(v)
            Ks = sorted({K for _, K in series})
            for (m, K), pts in sorted(series.items()):
                Ts = sorted(pts)
                # colour = K, line style and marker = backend
                st = backends.index(m) % 3
                ax.plot(Ts, [_geomean(pts[t]) for t in Ts], color=f"C{Ks.index(K)}", ls=("-", "--", ":")[st],
                        marker=("o", "s", "^")[st], label=f"{m} K={K}")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_title(f"vs {b}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("speed-up (geomean over d, ranks, dtype)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{op} {mode}, {arr} tokens — {res['machine']['device_name']}", fontsize=9)
        fig.tight_layout()
        p = out / f"speedup_{op}_{mode.replace('+', '_')}{'' if arr == 'grouped' else '_' + arr}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    roof = [r for r in rows if r.get("roofline_frac")]
    if roof:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
        for ax, mode in zip(axes[0], ("fwd", "fwd+bwd")):
            methods = sorted({r["method"] for r in roof})
            for m in methods:
                pts = [(r["T"], r["roofline_frac"]) for r in roof if r["method"] == m and r["mode"] == mode]
                if pts:
                    ax.scatter(*zip(*pts), s=12, label=m, alpha=0.7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel("fraction of roofline")
            ax.set_title(f"LoRA ops, {mode}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"roofline fraction — {res['machine']['device_name']}", fontsize=9)
        fig.tight_layout()
        p = out / "roofline.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def add_args(p: argparse.ArgumentParser) -> None:
    C.add_preset_args(p, PRESETS, "sweep size (default: gpu on CUDA, else cpu)",
                      "tiny shapes, 1-2 reps: proves the script runs (CI)")
    p.add_argument("--budget-s", type=float, help="stop the sweep after this many seconds (results so far are kept)")
    p.add_argument("--reps", type=int, help="timed reps per method (upper bound)")
    p.add_argument("--interpreted", action="store_true", help="also time triton under TRITON_INTERPRET on a CPU")
