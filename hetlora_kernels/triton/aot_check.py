"""Compile the LoRA kernels for sm_90 / sm_80 ahead of time, no GPU needed.

The interpreter (the CPU test mode) never lowers a kernel, so errors that only the
compiler sees (dot shapes, branch types, shared-memory overflow) would first show on a
GPU.  This compiles each kernel through Triton's own pipeline down to a cubin with the
``ptxas`` bundled in the triton wheel, and reports shared memory and whether tensor-core
instructions were emitted.  Run it in a process without ``TRITON_INTERPRET`` (the
interpreter patches the language globally, so nothing can be compiled beside it):

    env -u TRITON_INTERPRET python -m hetlora_kernels.triton.aot_check [--full]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _variants(full: bool, dtypes: tuple[str, ...] | None):
    """(kernel name, pointer types, constexprs, options) for each variant to compile."""
    dts = [("fp32", True, "ieee"), ("fp32", True, "tf32"), ("fp16", False, "ieee"), ("bf16", False, "ieee")]
    if not full:
        dts = [dts[0], dts[3]]
    if dtypes is not None:
        dts = [d for d in dts if d[0] in dtypes]
    bts = (16, 32, 64) if full else (64,)
    for (dt, f32, prec), bt in itertools.product(dts, bts):
        p = DTYPES[dt]
        common = {"order": "*i64", "offsets": "*i64", "scale_ptr": "*fp32", "scale_val": "fp32"}
        yield (
            "shrink",
            {**common, "X": p, "W": p, "H": "*fp32", "tiles": "*i32"},
            dict(HAS_SCALE_PTR=True, DOT_F32=f32, DOT_PREC=prec, BLOCK_T=bt, BLOCK_R=16, BLOCK_K=128),
            dict(num_warps=4, num_stages=3),
        )
        for acc in (True, False) if full else (True,):
            yield (
                "fused",
                {**common, "X": p, "A": p, "B": p, "Y": p, "H": "*fp32", "tiles": "*i32"},
                dict(HAS_SCALE_PTR=True, ACCUMULATE=acc, DOT_F32=f32, DOT_PREC=prec, BLOCK_T=bt, BLOCK_R=16,
                     BLOCK_K=128, BLOCK_N=128),
                dict(num_warps=4, num_stages=3),
            )  # fmt: skip
            yield (
                "expand",
                {**common, "H": "*fp32", "W": p, "Y": p, "tiles": "*i32"},
                dict(HAS_SCALE_PTR=False, ACCUMULATE=acc, DOT_F32=f32, DOT_PREC=prec, BLOCK_T=bt, BLOCK_R=16,
                     BLOCK_N=128),
                dict(num_warps=4, num_stages=3),
            )  # fmt: skip
        for direct in (True, False) if full else (True,):
            yield (
                "wgrad",
                {**common, "Hm": "*fp32", "X": p, "Out": p if direct else "*fp32", "chunks": "*i32"},
                dict(HAS_SCALE_PTR=direct, DIRECT=direct, DOT_F32=f32, DOT_PREC=prec, BLOCK_R=16, BLOCK_T=bt,
                     BLOCK_N=128),
                dict(num_warps=4, num_stages=3),
            )  # fmt: skip
            yield (
                "wgrad_pair",
                {**common, "G": "*fp32", "Xa": p, "OutA": p if direct else "*fp32", "H": "*fp32", "Xb": p,
                 "OutB": p if direct else "*fp32", "chunks": "*i32"},
                dict(HAS_SCALE_PTR=direct, SCALE_A=direct, DIRECT=direct, DOT_F32=f32, DOT_PREC=prec, BLOCK_R=16,
                     BLOCK_T=bt, BLOCK_N=128),
                dict(num_warps=4, num_stages=3),
            )  # fmt: skip
    yield (
        "wgrad_reduce",
        {"P": "*fp32", "Out": "*bf16", "chunk_starts": "*i32", "offsets": "*i64", "scale_ptr": "*fp32",
         "scale_val": "fp32"},
        dict(HAS_SCALE_PTR=True, BLOCK_R=16, BLOCK_N=128),
        dict(num_warps=4),
    )  # fmt: skip


def compile_all(caps: tuple[int, ...] = (90,), full: bool = False, dtypes: tuple[str, ...] | None = None) -> list[dict]:
    """Compile every variant for each compute capability; raises on the first failure.

    ``dtypes``: restrict to these of ``fp32``, ``fp16``, ``bf16`` (default: all that ``full`` picks).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_check must run without TRITON_INTERPRET (the interpreter cannot compile)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    from . import expand, fused, shrink, wgrad

    kernels = {
        "shrink": shrink._shrink_kernel,
        "expand": expand._expand_kernel,
        "fused": fused._fused_fwd_kernel,
        "wgrad": wgrad._wgrad_kernel,
        "wgrad_pair": wgrad._wgrad_pair_kernel,
        "wgrad_reduce": wgrad._wgrad_reduce_kernel,
    }
    rows = []
    for cap in caps:
        for name, ptrs, consts, opts in _variants(full, dtypes):
            fn = kernels[name]
            fn = fn.fn if isinstance(fn, Autotuner) else fn
            sig = {a: ("constexpr" if a in consts else ptrs.get(a, "i32")) for a in fn.arg_names}
            ck = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", cap, 32), options=opts)
            ptx = ck.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
            rows.append(dict(cap=cap, kernel=name, consts=consts, shared=ck.metadata.shared, mma=mma))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every dtype, token tile and mode (a few minutes)")
    ap.add_argument("--caps", default="90,80", help="compute capabilities, comma-separated")
    ap.add_argument("--dtypes", default=None, help="restrict to these input dtypes, e.g. bf16,fp32")
    args = ap.parse_args(argv)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else None
    rows = compile_all(tuple(int(c) for c in args.caps.split(",")), args.full, dtypes)
    for r in rows:
        c = r["consts"]
        tag = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("BLOCK_R",))
        print(f"sm_{r['cap']} {r['kernel']:<13} smem={r['shared']:>6} mma={r['mma']:<5} {tag}")
    print(f"compiled {len(rows)} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
