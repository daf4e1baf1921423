"""``python -m bench kernels|e2e|serve|profile|report``: the benchmark command line (``hetlora bench``
delegates here)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the CPU peak-memory measure runs the profiler once per row: keep kineto's per-start/stop
    # trace lines ("USDT: ... profiler_start") out of the progress output
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    from bench import e2e, kernels, profile, report, serve

    kernels.add_args(sub.add_parser("kernels", help="microbenchmarks of every op and backend vs baselines"))
    e2e.add_args(sub.add_parser("e2e", help="concurrent vs sequential (peft) local training, client-steps/s"))
    serve.add_args(sub.add_parser("serve", help="many adapters in one batch: greedy generation, tokens/s vs peft"))
    profile.add_args(sub.add_parser("profile", help="one shape: host vs device time per LoRA call, per method",
                                    description=(profile.__doc__ or "").split("\n\n")[0]))
    report.add_args(sub.add_parser("report", help="regenerate README's Performance section from results"))
    sub.add_parser("env", help="print the machine, versions and backend status (bench/gpu_all.sh's first stage)")
    args = p.parse_args(argv)
    if args.cmd == "kernels":
        kernels.run(args)
    elif args.cmd == "e2e":
        e2e.run(args)
    elif args.cmd == "serve":
        serve.run(args)
    elif args.cmd == "profile":
        profile.run(args)
    elif args.cmd == "env":
        print_env()
    else:
        return report.run(args)
    return 0


def print_env() -> None:
    import json

    import torch

    import hetlora_kernels as hk
    from bench.common import machine_info

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(dev)
    info["backends"] = {b: list(hk.backend_status(b, dev)) for b in ("torch", "triton", "cuda")}
    info["grouped_mm"] = hasattr(torch, "_grouped_mm")
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    sys.exit(main())
