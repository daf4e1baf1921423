"""The CUDA kernels of ``csrc/cuda`` run on the CPU, for the tests.

This machine has nvcc but no GPU, so without this the ``.cu`` kernels are only compiled.
``build()`` compiles ``lora_kernels.cu`` and ``server_kernels.cu`` *unchanged* with g++
against the emulator of ``csrc/emu`` (shim CUDA headers; every CUDA thread a fiber, so
``__syncthreads`` and warp shuffles really wait for the other threads; see
``csrc/emu/hetlora_emu.h``).  The one textual step: a launch ``k<<<g, b, s, st>>>(args)``
becomes ``Launch(g, b, s, st)(k, args)``.

``EmulatedC`` stands in for the CUDA half of ``hetlora_kernels._C``: the same functions, the
argument preparation of ``csrc/bindings.cpp`` and the allocations of
``csrc/cuda/bindings_cuda.cpp``, with CPU tensors for device memory.  ``emulated()`` swaps
it in for ``hetlora_kernels.cuda._C``, so ``use_backend("cuda")`` on CPU tensors runs the
CUDA kernels through the backend's own Python (autograd, dtype splits, checks).

Device memory is guarded: every float buffer a kernel sees (inputs and outputs) sits
between two runs of signalling-NaN sentinels, outputs the binding allocates with
``at::empty`` start as NaN, and after each launch the sentinels must be intact.  A read
past a buffer therefore turns a result into NaN, and a write past it is caught.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = ROOT / "csrc" / "emu"
BUILD_DIR = ROOT / "build" / "cuda_emu"
KERNEL_FILES = ("lora_kernels.cu", "server_kernels.cu")
CXX_FLAGS = ["-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]

# `name<tmpl>  <<< config >>> (`  ->  `::hetlora_emu::Launch(config)(name<tmpl>, `
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
CUDA_ERRORS = {1: "cudaErrorInvalidValue", 9: "cudaErrorInvalidConfiguration", 719: "cudaErrorLaunchFailure"}
# sentinel elements on each side of a buffer: more than a stray column tile or a few stray rows
# reach past the end, and odd, so no kernel's tiling lines up with it
GUARD = 4099
_SENTINEL_BITS = {  # NaNs with a payload no arithmetic produces
    torch.float32: (torch.int32, 0x7FA5A5A5),
    torch.float64: (torch.int64, 0x7FF5A5A5A5A5A5A5),
    torch.float16: (torch.int16, 0x7D5A),
    torch.bfloat16: (torch.int16, 0x7FA5),
}


def translate(source: str) -> tuple[str, int]:
    """(the source with every ``<<<...>>>`` launch rewritten, the number of launches)."""
    return _LAUNCH.subn(r"::hetlora_emu::Launch(\2)(\1, ", source)


def _emu_files() -> list[Path]:
    return sorted(p for p in EMU_DIR.rglob("*") if p.is_file())


def build(mutate: Callable[[str, str], str] | None = None) -> Path:
    """Compile the kernels with the emulator into a shared library (cached by content).

    ``mutate(file_name, translated_source)`` may change a kernel first: the tests use it to
    show that a broken kernel is caught.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError("the CUDA emulator needs a C++ compiler (g++ or $CXX), and none is on PATH")
    sources = {}
    for name in KERNEL_FILES:
        text, n = translate((CUDA_DIR / name).read_text())
        if n == 0:
            raise RuntimeError(f"csrc/cuda/{name}: no <<<...>>> launch found to translate")
        sources[name] = mutate(name, text) if mutate else text
    digest = hashlib.sha256()
    for name, text in sources.items():
        digest.update(name.encode() + text.encode())
    for path in [*_emu_files(), *sorted(CUDA_DIR.glob("*.cuh"))]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join([cxx, *CXX_FLAGS]).encode())
    out_dir = BUILD_DIR / digest.hexdigest()[:16]
    lib = out_dir / "libhetlora_cuda_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for name, text in sources.items():
        unit = out_dir / (Path(name).stem + ".cpp")
        unit.write_text(text)
        units.append(unit)
    units += [EMU_DIR / "runtime.cpp", EMU_DIR / "entry.cpp"]
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    cmd = [cxx, *CXX_FLAGS, f"-I{EMU_DIR / 'include'}", f"-I{EMU_DIR}", f"-I{CUDA_DIR}", *map(str, units)]
    proc = subprocess.run([*cmd, "-o", str(partial)], capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    partial.replace(lib)  # atomic: a concurrent build never loads half a file
    return lib


_I64P = ctypes.POINTER(ctypes.c_int64)
_VP = ctypes.c_void_p
_I64 = ctypes.c_int64
_SIGNATURES = {
    "shrink": [ctypes.c_int, _VP, _VP, _VP, _I64P, _I64P, _I64P, _VP, ctypes.c_double, *[_I64] * 5],
    "expand": [ctypes.c_int, _VP, _VP, _VP, _I64P, _I64P, _I64P, _VP, ctypes.c_double, *[_I64] * 5],
    "wgrad": [ctypes.c_int, _VP, _VP, _VP, _VP, _I64P, _I64P, _I64P, _VP, ctypes.c_double, *[_I64] * 4],
    "component_norms": [ctypes.c_int, _I64P, _I64, _VP, _VP, _VP, _I64P, _I64, _I64, _I64],
    "weighted_aggregate": [ctypes.c_int, _I64P, _I64, _I64, _VP, _I64P, _I64, _I64],
    "delta_fro_sq": [ctypes.c_int, _I64P, _I64, _VP, _VP, _I64P, _I64, _I64, _I64],
}


class Emulator:
    """The loaded library: the kernels' launchers, the scheduling order, the counters."""

    def __init__(self, lib_path: Path):
        self.path = lib_path
        self.lib = ctypes.CDLL(str(lib_path))
        for op, args in _SIGNATURES.items():
            fn = getattr(self.lib, f"hetlora_emu_{op}")
            fn.argtypes, fn.restype = args, ctypes.c_int
        for fn in (
            "hetlora_emu_wgrad_workspace",
            "hetlora_emu_wgrad_chunks",
            "hetlora_emu_delta_fro_workspace",
            "hetlora_emu_delta_fro_splits",
        ):
            getattr(self.lib, fn).argtypes, getattr(self.lib, fn).restype = [_I64] * 4, _I64
        self.lib.hetlora_emu_message.restype = ctypes.c_char_p
        self.lib.hetlora_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_uint64]
        self.lib.hetlora_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        # the emulator runs one launch at a time (its scheduler and error state are global),
        # and ctypes drops the GIL during a call
        self._lock = threading.Lock()

    def schedule(self, mode: str, seed: int = 0) -> None:
        """The order ready threads run in: 'ascending', 'descending' or 'random' (seeded)."""
        codes = {"ascending": 0, "descending": 1, "random": 2}
        self.lib.hetlora_emu_set_schedule(codes[mode], seed)

    def counters(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * 3)()
        self.lib.hetlora_emu_counters(out)
        return {"launches": out[0], "blocks": out[1], "threads": out[2]}

    def call(self, op: str, *args) -> None:
        with self._lock:
            self.lib.hetlora_emu_reset()
            rc = getattr(self.lib, f"hetlora_emu_{op}")(*args)
            msg = self.lib.hetlora_emu_message().decode()
        if rc != 0 or msg:
            raise RuntimeError(f"emulated CUDA {op}: {CUDA_ERRORS.get(rc, rc)}: {msg or 'no detail'}")


_cache: dict[Path, Emulator] = {}


def load(lib_path: Path | None = None) -> Emulator:
    lib_path = lib_path or build()
    if lib_path not in _cache:
        _cache[lib_path] = Emulator(lib_path)
    return _cache[lib_path]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Guarded:
    """Float buffers with sentinel runs on both sides, checked after every launch."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype, zero: bool) -> torch.Tensor:
        int_dtype, bits = _SENTINEL_BITS[dtype]
        n = math.prod(shape)
        buf = torch.full((n + 2 * GUARD,), bits, dtype=int_dtype).view(dtype)
        view = buf[GUARD : GUARD + n]
        if zero:
            view.zero_()
        else:  # at::empty: the kernel must write every element it claims to
            view.fill_(float("nan"))
        self.buffers.append(buf)
        return view.view(shape)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        out = self.alloc(tuple(t.shape), t.dtype, zero=True)
        out.copy_(t)
        return out

    def check(self, op: str) -> None:
        for buf in self.buffers:
            int_dtype, bits = _SENTINEL_BITS[buf.dtype]
            raw = buf.view(int_dtype)
            for side, part in (("before", raw[:GUARD]), ("after", raw[-GUARD:])):
                if not bool((part == bits).all()):
                    raise AssertionError(f"emulated CUDA {op} wrote {side} a buffer of {buf.numel() - 2 * GUARD}")


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _idx(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), _I64P)


class EmulatedC:
    """``hetlora_kernels._C`` as it behaves on CUDA tensors, its kernels emulated on CPU tensors."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    @staticmethod
    def with_cuda() -> bool:
        return True

    def _launch(self, op: str, mem: _Guarded, *args) -> None:
        self.emu.call(op, *args)
        mem.check(op)

    @staticmethod
    def _index(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int64).contiguous()

    @staticmethod
    def _scales(mem: _Guarded, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if scales is None else mem.copy(scales.to(_acc(dtype)))

    def shrink(self, x, w, order, starts, offsets, scales=None, scale=1.0, base=0, r_max=None):
        mem = _Guarded()
        x, w = mem.copy(x), mem.copy(w)
        s = self._scales(mem, scales, x.dtype)
        order, starts, offsets = map(self._index, (order, starts, offsets))
        T, d, K = x.shape[0], x.shape[1], offsets.numel() - 1
        h = mem.alloc((T, r_max), _acc(x.dtype), zero=base > 0)
        self._launch(
            "shrink", mem, DTYPE_CODE[x.dtype], _p(x), _p(w), _p(h), _idx(order), _idx(starts), _idx(offsets),
            _p(s), scale, base, T, K, d, r_max,
        )  # fmt: skip
        return h

    def expand(self, h, w, order, starts, offsets, scales=None, scale=1.0, base=0):
        mem = _Guarded()
        h, w = mem.copy(h), mem.copy(w)
        s = self._scales(mem, scales, w.dtype)
        order, starts, offsets = map(self._index, (order, starts, offsets))
        T, d, K = h.shape[0], w.shape[1], offsets.numel() - 1
        y = mem.alloc((T, d), w.dtype, zero=base > 0)
        self._launch(
            "expand", mem, DTYPE_CODE[w.dtype], _p(h), _p(w), _p(y), _idx(order), _idx(starts), _idx(offsets),
            _p(s), scale, base, T, K, d, h.shape[1],
        )  # fmt: skip
        return y

    def wgrad(self, h, x, order, starts, offsets, scales=None, scale=1.0, total_rank=None):
        mem = _Guarded()
        h, x = mem.copy(h), mem.copy(x)
        s = self._scales(mem, scales, x.dtype)
        order, starts, offsets = map(self._index, (order, starts, offsets))
        K = offsets.numel() - 1
        out = mem.alloc((total_rank, x.shape[1]), x.dtype, zero=False)
        # as bindings_cuda.cpp: the two-pass path's partial sums, where cuda::wgrad_chunks asks for them
        ws = self.emu.lib.hetlora_emu_wgrad_workspace(x.shape[0], K, x.shape[1], h.shape[1])
        work = mem.alloc((ws,), _acc(x.dtype), zero=False) if ws > 0 else None
        self._launch(
            "wgrad", mem, DTYPE_CODE[x.dtype], _p(h), _p(x), _p(out), _p(work), _idx(order), _idx(starts),
            _idx(offsets), _p(s), scale, x.shape[0], K, x.shape[1], h.shape[1],
        )  # fmt: skip
        return out

    def wgrad_chunks(self, T: int, K: int, d: int, r_max: int) -> int:
        """cuda::wgrad_chunks: token slices per group of the two-pass weight gradient."""
        return self.emu.lib.hetlora_emu_wgrad_chunks(T, K, d, r_max)

    @staticmethod
    def _table(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).contiguous()

    @classmethod
    def _factor_table(cls, A: list, B: list) -> torch.Tensor:
        """[L, 4] rows {A_l, B_l, d_in_l, d_out_l}, as bindings_cuda.cpp's factor_table."""
        return cls._table([[a.data_ptr(), b.data_ptr(), a.shape[1], b.shape[1]] for a, b in zip(A, B)])

    def component_norms(self, As, Bs, offsets, r_max):
        mem = _Guarded()
        A, B = [mem.copy(a) for a in As], [mem.copy(b) for b in Bs]
        offsets = self._index(offsets)
        L, R, K = len(A), A[0].shape[0], offsets.numel() - 1
        acc = _acc(A[0].dtype)
        out = mem.alloc((L, K, r_max), acc, zero=True)
        na, nb = mem.alloc((L, R), acc, zero=False), mem.alloc((L, R), acc, zero=False)
        table = self._factor_table(A, B)
        self._launch(
            "component_norms", mem, DTYPE_CODE[A[0].dtype], _idx(table), L, _p(out), _p(na), _p(nb),
            _idx(offsets), R, K, r_max,
        )  # fmt: skip
        return out, na, nb

    def weighted_aggregate(self, ts, offsets, weights, out_rank):
        mem = _Guarded()
        t = [mem.copy(x) for x in ts]
        offsets = self._index(offsets)
        w = mem.copy(weights.to(_acc(t[0].dtype)))
        outs = [mem.alloc((out_rank, x.shape[1]), x.dtype, zero=False) for x in t]
        table = self._table([[x.data_ptr(), o.data_ptr(), x.shape[1]] for x, o in zip(t, outs)])
        max_d = max(x.shape[1] for x in t)
        self._launch(
            "weighted_aggregate", mem, DTYPE_CODE[t[0].dtype], _idx(table), len(t), max_d, _p(w), _idx(offsets),
            offsets.numel() - 1, out_rank,
        )  # fmt: skip
        return outs

    def delta_fro_splits(self, L: int, K: int, r_max: int, max_d: int) -> int:
        """cuda::delta_fro_splits: column ranges per Gram tile pair."""
        return self.emu.lib.hetlora_emu_delta_fro_splits(L, K, r_max, max_d)

    def delta_fro_sq(self, As, Bs, offsets, r_max):
        mem = _Guarded()
        A, B = [mem.copy(a) for a in As], [mem.copy(b) for b in Bs]
        offsets = self._index(offsets)
        L, K = len(A), offsets.numel() - 1
        max_d = max(max(a.shape[1], b.shape[1]) for a, b in zip(A, B))
        acc = _acc(A[0].dtype)
        out = mem.alloc((L, K), acc, zero=False)
        work = mem.alloc((self.emu.lib.hetlora_emu_delta_fro_workspace(L, K, r_max, max_d),), acc, zero=False)
        table = self._factor_table(A, B)
        self._launch(
            "delta_fro_sq", mem, DTYPE_CODE[A[0].dtype], _idx(table), L, _p(out), _p(work), _idx(offsets), K, r_max,
            max_d,
        )  # fmt: skip
        return out


@contextlib.contextmanager
def emulated(emu: Emulator | None = None) -> Iterator[EmulatedC]:
    """Within: ``hetlora_kernels.cuda._C`` is an ``EmulatedC`` (the CUDA kernels on CPU tensors)."""
    from hetlora_kernels import cuda as cuda_backend

    fake = EmulatedC(emu or load())
    with mock.patch.object(cuda_backend, "_C", fake):
        yield fake
