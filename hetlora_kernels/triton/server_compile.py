"""Compile the server-op kernels for a GPU target without a GPU (ahead-of-time check).

The test suite runs the kernels under ``TRITON_INTERPRET=1``, which never lowers them to PTX:
constructs the interpreter accepts but the compiler rejects (a dot operand type, a shared-memory
budget) would only show on a GPU.  This module lowers every kernel, with the GPU block shapes of
`server_ops` and each input dtype, to a cubin for ``--arch`` (Triton ships its own ptxas), and
prints one JSON line per variant: kernel, dtype, shared memory bytes, registers where reported.

    python -m hetlora_kernels.triton.server_compile --arch 90

Must run with ``TRITON_INTERPRET`` unset (the kernels must be JIT functions, not interpreted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

from . import server_ops as so

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def variants() -> list[tuple[object, dict[str, str], dict[str, object], str]]:
    """(kernel, signature, constexprs, dtype name) for every dtype and GPU block shape in use."""
    out = []
    for dtype, ty in _TY.items():
        acc_t = "fp64" if dtype == torch.float64 else "fp32"
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        norms_sig = {
            "tab_ptr": "*i64", "dest_ptr": "*i64", "out_ptr": f"*{acc_t}", "na_ptr": f"*{acc_t}",
            "nb_ptr": f"*{acc_t}", "R": "i32", "OUT_STRIDE": "i32", "witness_ptr": f"*{ty}",
        }  # fmt: skip
        norms_c = {"NF": so._NF_NORMS, "ACC": acc, "BLOCK_R": so.GPU_BLOCK_R, "BLOCK_D": so.GPU_BLOCK_D}
        out.append((so._comp_norms_fwd_kernel, norms_sig, norms_c, ty))
        # the backward reads the output's gradient where the forward writes the output
        bwd_sig = {("gout_ptr" if k == "out_ptr" else k): v for k, v in norms_sig.items()}
        out.append((so._comp_norms_bwd_kernel, bwd_sig, norms_c, ty))
        for max_rank in (8, 64):  # the GPU's Gram tile, and the largest there has been
            fro_sig = {
                "tab_ptr": "*i64",
                "off_ptr": "*i64",
                "part_ptr": f"*{acc_t}",
                "NT": "i32",
                "witness_ptr": f"*{ty}",
            }
            fro_c = {
                "NF": so._NF_NORMS, "ACC": acc, "DOT_UPCAST": dtype in (torch.float32, torch.float64),
                "BLOCK_T": so.gram_block_t(max_rank, interpret=False) if max_rank == 8 else 64,
                "BLOCK_D": so.gpu_gram_block_d(dtype),
            }  # fmt: skip
            out.append((so._delta_fro_kernel, fro_sig, fro_c, ty))
        agg_sig = {
            "tab_ptr": "*i64",
            "rowptr_ptr": "*i64",
            "src_ptr": "*i64",
            "w_ptr": f"*{acc_t}",
            "witness_ptr": f"*{ty}",
        }
        agg_c = {"NF": so._NF_COPY, "ACC": acc, "BLOCK_S": 64, "BLOCK_D": so.GPU_BLOCK_D}
        out.append((so._aggregate_kernel, agg_sig, agg_c, ty))
        gat_sig = {"tab_ptr": "*i64", "idx_ptr": "*i64", "R_out": "i32", "witness_ptr": f"*{ty}"}
        gat_c = {"NF": so._NF_COPY, "BLOCK_R": so.GPU_BLOCK_R, "BLOCK_D": so.GPU_BLOCK_D}
        out.append((so._gather_rows_kernel, gat_sig, gat_c, ty))
    return out


def compile_all(arch: int, dtypes: set[str] | None = None) -> list[dict]:
    """Lower every variant (of ``dtypes``, default all) to a cubin for ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if so.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kern, sig, consts, ty in variants():
        if dtypes is not None and ty not in dtypes:
            continue
        full = dict(sig)
        full.update({k: "constexpr" for k in consts})
        c = triton.compile(ASTSource(fn=kern, signature=full, constexprs=consts), target=target)
        ptx = c.asm["ptx"]
        results.append(
            {
                "kernel": kern.__name__,
                "dtype": ty,
                "consts": {k: str(v) for k, v in consts.items() if k.startswith("BLOCK")},
                "shared": int(c.metadata.shared),
                "local_memory": ".local" in ptx,
                "cubin_bytes": len(c.asm["cubin"]),
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--dtypes", default="", help="comma-separated subset of fp32,fp16,bf16,fp64")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    dtypes = set(args.dtypes.split(",")) if args.dtypes else None
    for r in compile_all(args.arch, dtypes):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
