"""Run by tests/test_triton_fast_launch.py in a process without ``TRITON_INTERPRET``: Triton's
launch path on a CPU, with a stand-in CUDA driver and compiled kernels replaced by recorders.

Everything Triton does in Python before its C launcher runs for real (the autotuner's key and
choice, the binder's specialisation of each argument, the kernel cache); the recorders then
receive exactly what the C launcher would.  Each op is called on the slow path (Triton's own)
and on the fast path (`hetlora_kernels.triton.launch`) with the same inputs, and the probe
prints, as JSON, for each call: which compiled kernel received it (Triton compiles a new one
per specialisation key, so a fast path that reused a kernel compiled for other alignments or
values would show a different one), the grid, and the arguments with tensors reduced to
(dtype, shape, strides, address mod 16).  Also the host microseconds per call of each path.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["HETLORA_TRITON_AUTOTUNE"] = "1"  # several configs: the autotuner's choice is exercised

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit as jit_mod  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

RECORD: list[tuple] = []
RECORDING = [True]  # off while timing: the record itself costs more than a launch path


def _no_hook(h) -> bool:
    """Older Tritons pass None for no launch hook, newer ones an empty HookChain."""
    return h is None or (hasattr(h, "calls") and not h.calls)


class FakeDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_active_torch_device(self):
        return torch.device("cpu")


class FakeKernel:
    """Stands in for a CompiledKernel; one per Triton cache key (``n`` tells them apart)."""

    count = 0

    def __init__(self) -> None:
        FakeKernel.count += 1
        self.n = FakeKernel.count
        self.function = f"fn{self.n}"
        self.packed_metadata = ("meta", self.n)

    def launch_metadata(self, *a):
        return None

    def run(self, g0, g1, g2, stream, function, packed, launch_md, enter, exit_, *args):
        CHOSEN.append((self.fn_name, self.constexprs))
        if RECORDING[0]:
            RECORD.append((self.n, (g0, g1, g2), stream, function, packed, _no_hook(enter), _no_hook(exit_),
                           tuple(_norm(a) for a in args)))


def _norm(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), tuple(a.shape), tuple(a.stride()), a.data_ptr() % 16)
    return (type(a).__name__, a if not isinstance(a, float) else round(a, 12))


CHOSEN: list[tuple[str, dict]] = []  # (kernel, its constexprs) per launch, for the pinned mode


def _fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    k = FakeKernel()
    names = dict(enumerate(self.arg_names))
    k.fn_name = self.__name__
    k.constexprs = {names.get(p[0], str(p)) if isinstance(p, tuple) and len(p) == 1 else str(p): v
                    for p, v in constexprs.items() if isinstance(v, int) and not isinstance(v, bool)}
    k.constexprs["num_warps"] = getattr(options, "num_warps", None)
    self.device_caches[device][0][key] = k
    return k


if not (hasattr(driver, "set_active") and hasattr(jit_mod.JITFunction, "_do_compile")
        and hasattr(Autotuner, "_bench")):
    print(json.dumps({"unsupported": "this Triton lacks driver.set_active, JITFunction._do_compile or "
                                     "Autotuner._bench"}))
    sys.exit(0)
driver.set_active(FakeDriver())
jit_mod.JITFunction._do_compile = _fake_compile
# the autotuner "times" configs: the last one wins, so its block sizes must reach the launch
Autotuner._bench = lambda self, *a, config=None, **k: [-float(self.configs.index(config))]

import hetlora_kernels as hk  # noqa: E402
from hetlora_kernels.triton import expand, fused, launch, shrink, wgrad  # noqa: E402
from hetlora_kernels.triton import server_ops as so  # noqa: E402


def cases():
    """(name, call) pairs: each call launches one or more kernels with fixed inputs."""
    g = torch.Generator().manual_seed(0)
    out = []
    for dt in (torch.bfloat16, torch.float32):
        for d, ranks, lengths in ((64, [3, 16, 1], [5, 40, 2]), (17, [8, 33], [70, 9])):
            layout = hk.AdapterLayout(ranks)
            groups = hk.TokenGroups.from_lengths(lengths)
            T = sum(lengths)
            xb = torch.randn(T + 1, d, generator=g).to(dt)
            x = xb[1:]  # row 1 on: 16-byte aligned only where d * itemsize is
            A = torch.randn(layout.total_rank, d, generator=g).to(dt)
            B = torch.randn(layout.total_rank, d + 3, generator=g).to(dt)
            dy = torch.randn(T, d + 3, generator=g).to(dt)
            s = torch.rand(len(ranks), generator=g)
            h = torch.randn(T, layout.max_rank, generator=g)
            tag = f"{str(dt)[6:]}-d{d}"
            out += [
                (f"shrink-{tag}", lambda x=x, A=A, lay=layout, gr=groups: shrink.shrink(x, A, lay, gr)),
                (f"shrink-aligned-{tag}", lambda xb=xb, A=A, lay=layout, gr=groups, T=T: shrink.shrink(
                    xb[:T], A, lay, gr)),
                (f"shrink-scaled-{tag}", lambda x=x, A=A, lay=layout, gr=groups, s=s: shrink.shrink(
                    x, A, lay, gr, s)),
                (f"expand-{tag}", lambda h=h, B=B, lay=layout, gr=groups: expand.expand(h, B, lay, gr, 0.5)),
                (f"fused-{tag}", lambda x=x, A=A, B=B, lay=layout, gr=groups, s=s: fused.fused_forward(
                    x, A, B, lay, gr, s, None)),
                (f"wgrad-{tag}", lambda h=h, x=x, lay=layout, gr=groups: wgrad.wgrad(h, x, lay, gr, 2.0)),
                (f"wgrad-chunked-{tag}", lambda h=h, x=x, lay=layout, gr=groups: wgrad.wgrad(
                    h, x, lay, gr, 2.0, chunk_t=16)),
                (f"wgrad-pair-{tag}", lambda h=h, x=x, dy=dy, lay=layout, gr=groups, s=s: wgrad.wgrad_pair(
                    h, x, h, dy, lay, gr, s, chunk_t=16)),
                (f"delta-fro-{tag}", lambda A=A, B=B, lay=layout, s=s, d=d: so.delta_fro_norms_impl(
                    [A], [B[:, :d]], lay, s.double())),
            ]
    return out


def main() -> int:
    results = {}
    for name, call in cases():
        rec = {}
        for mode in ("slow", "fast-miss", "fast-hit"):
            launch.FAST_LAUNCH = mode != "slow"
            del RECORD[:]
            before = dict(launch.STATS)
            try:
                call()
            except Exception as e:  # noqa: BLE001 - reported to the test
                rec[mode] = f"error: {type(e).__name__}: {e}"
                continue
            rec[mode] = [list(map(repr, r)) for r in RECORD]
            rec[mode + ":stats"] = {k: v - before[k] for k, v in launch.STATS.items()}
        # pinned (hetlora_kernels.pinned_kernel_configs), on either path: the first config's
        # block sizes and warps, whatever the autotuner picked above (the last config)
        for fast in (False, True):
            launch.FAST_LAUNCH = fast
            del CHOSEN[:]
            try:
                with hk.pinned_kernel_configs():
                    call()
                rec["pinned" + ("-fast" if fast else "")] = [[n, c] for n, c in CHOSEN]
            except Exception as e:  # noqa: BLE001 - reported to the test
                rec["pinned" + ("-fast" if fast else "")] = f"error: {type(e).__name__}: {e}"
        del CHOSEN[:]
        launch.FAST_LAUNCH = False
        call()  # and after the block, the autotuner's pick again
        rec["unpinned"] = [[n, c] for n, c in CHOSEN]
        results[name] = rec
    # every autotuned kernel's configs (block sizes and warps), first and the others
    tuned = {}
    for m in (shrink, expand, fused, wgrad, so):
        for n in dir(m):
            k = getattr(m, n)
            if isinstance(k, Autotuner):
                tuned[k.fn.__name__] = [{**c.kwargs, "num_warps": c.num_warps} for c in k.configs]
    # host time per call of one shrink on each path (the fake launcher does nothing)
    layout = hk.AdapterLayout([16] * 8)
    groups = hk.TokenGroups.from_lengths([64] * 8)
    x = torch.randn(512, 256, dtype=torch.bfloat16)
    A = torch.randn(layout.total_rank, 256, dtype=torch.bfloat16)
    timing = {}
    RECORDING[0] = False
    for mode in ("slow", "fast"):
        launch.FAST_LAUNCH = mode == "fast"
        for _ in range(20):
            shrink.shrink(x, A, layout, groups)
        n = 300
        t0 = time.perf_counter()
        for _ in range(n):
            shrink.shrink(x, A, layout, groups)
        timing[mode] = (time.perf_counter() - t0) / n * 1e6
    json.dump({"calls": results, "shrink_us": timing, "tuned": tuned}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
