"""How ``hetlora_kernels._C`` is built: by setup.py (``extension_setup_args``) and by the
developers' JIT path (``hetlora_kernels.cuda.build_jit``), from the same lists.

* The C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp) are built always.
* The CUDA kernels (csrc/cuda/*.cu) and their thin torch binding
  (csrc/cuda/bindings_cuda.cpp) are added only when a CUDA toolkit *and* a CUDA build
  of torch are present, for sm_80 and sm_90 (plus PTX for newer GPUs).  No kernel uses
  wgmma or setmaxnreg, so there is no sm_90a target: it would add build time and nothing
  else.
* A failed or skipped build never fails the install: the torch and triton backends need
  no compiled code.  The reason is printed as one paragraph (``pip install -v`` shows it;
  pip hides a successful build's output) and ``hetlora_kernels.cuda.available`` repeats
  it at run time.

Environment knobs: ``HETLORA_SKIP_EXT=1`` builds nothing; ``HETLORA_NO_CUDA=1`` builds the
CPU kernels only; ``MAX_JOBS`` bounds ninja's parallel compiles (torch's convention).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent
EXT_NAME = "hetlora_kernels._C"

# -gencode pairs: native code for A100 (sm_80) and H100/H200 (sm_90), PTX for later GPUs.
NVCC_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
# -g0: no debug info (a faster build); -fopenmp: at::parallel_for is an OpenMP region in torch's headers
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]  # resolves to the libgomp.so.1 that torch itself loads
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", *NVCC_ARCH_FLAGS]

_FALLBACK = (
    "The package is installed without it: the 'torch' backend (pure PyTorch) and the 'triton' "
    "backend work as before, and use_backend('cuda') raises with this reason. To retry, fix the "
    "cause and run `pip install --no-build-isolation --no-deps -e .` again, or set HETLORA_JIT=1 "
    "to compile it on first use."
)


def cxx_runtime() -> str | None:
    """Path of the libstdc++ shared library this process runs on (torch loads it), or None.

    Linux only: read from /proc/self/maps after importing torch.
    """
    import torch  # noqa: F401 - importing torch loads the C++ runtime it was linked against

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[-1]).name.startswith("libstdc++.so"):
            return fields[-1]
    return None


def link_flags() -> list[str]:
    """``LINK_FLAGS`` plus the process's own libstdc++, named by path.

    Why by path: on the lent GPU machines' image the default link put a static copy of
    libstdc++ inside the extension (`ldd` showed no libstdc++.so, and the extension held
    ``std::ostream::_M_insert<long>``).  Two C++ runtimes in one process then share
    locale facets by index: the first TORCH_CHECK message that formats an integer
    crashed the interpreter (SIGSEGV in ``codecvt::do_unshift``; on this machine a
    forced ``-static-libstdc++`` only drops the number from the message).  A shared
    library given by path is linked dynamically whatever the toolchain's default, and
    it resolves every C++ runtime symbol before the driver's implicit ``-lstdc++``.
    ``hetlora_kernels.cuda`` refuses a module that still carries its own copy.
    """
    rt = cxx_runtime()
    # no libstdc++.so in the process (a torch with its own hidden copy): the system one, by
    # its soname, which the driver's implicit -lstdc++ would not pick while static is the default
    return [*LINK_FLAGS, rt or "-l:libstdc++.so.6"]


def cpu_sources() -> list[Path]:
    return [CSRC / "bindings.cpp", *sorted((CSRC / "cpu").glob("*.cpp"))]


def cuda_sources() -> list[Path]:
    cu = CSRC / "cuda"
    return [*sorted(cu.glob("*.cu")), cu / "bindings_cuda.cpp"]


def cuda_plan() -> tuple[bool, str]:
    """(build the CUDA kernels?, why not).  Needs torch importable."""
    if os.environ.get("HETLORA_NO_CUDA", "") not in ("", "0"):
        return False, "HETLORA_NO_CUDA is set"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (a CUDA extension cannot link against it)"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    return True, ""


def notice(title: str, reason: str, tail: str = _FALLBACK) -> None:
    """One readable paragraph on stderr (no traceback)."""
    body = textwrap.fill(f"hetlora: {title}: {reason}. {tail}", width=100)
    bar = "-" * 100
    print(f"\n{bar}\n{body}\n{bar}\n", file=sys.stderr, flush=True)


def _rel(paths: list[Path]) -> list[str]:
    # setuptools prefers sources relative to the setup.py directory, which is where pip
    # runs it; anywhere else absolute paths are the safe choice
    if Path.cwd().resolve() == ROOT:
        return [str(p.relative_to(ROOT)) for p in paths]
    return [str(p) for p in paths]


def extension_setup_args() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for setup(); empty lists when nothing can be built."""
    if os.environ.get("HETLORA_SKIP_EXT", "") not in ("", "0"):
        notice("hetlora_kernels._C was not built", "HETLORA_SKIP_EXT is set")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any failure to import torch means: no extension
        notice(
            "hetlora_kernels._C was not built",
            f"torch is not importable in the build environment ({type(e).__name__}: {e}); "
            "install torch first and build with --no-build-isolation",
        )
        return [], {}

    with_cuda, why_not = cuda_plan()
    sources = cpu_sources() + (cuda_sources() if with_cuda else [])
    kwargs = dict(
        name=EXT_NAME,
        sources=_rel(sources),
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": list(CXX_FLAGS), **({"nvcc": list(NVCC_FLAGS)} if with_cuda else {})},
        extra_link_args=link_flags(),
    )
    if with_cuda:
        ext = CUDAExtension(define_macros=[("WITH_CUDA", None)], **kwargs)
    else:
        ext = CppExtension(**kwargs)

    class TolerantBuildExt(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension that reports a failed build instead of failing the install."""

        failed = False

        def run(self):
            if not with_cuda:
                print(f"hetlora: building the C++ CPU kernels only ({why_not})", file=sys.stderr, flush=True)
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - compiler, ninja or linker errors alike
                TolerantBuildExt.failed = True
                msg = str(e).strip().splitlines()
                notice(
                    "building the C++/CUDA extension hetlora_kernels._C failed",
                    f"{type(e).__name__}: {msg[-1] if msg else 'no message'} (the compiler output is above)",
                )

        def get_outputs(self):
            # after a failure, setuptools (editable installs too) must not look for the .so
            return [] if TolerantBuildExt.failed else super().get_outputs()

        def get_output_mapping(self):
            return {} if TolerantBuildExt.failed else super().get_output_mapping()

    return [ext], {"build_ext": TolerantBuildExt}
