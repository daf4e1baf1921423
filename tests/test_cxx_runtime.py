"""The extension must share the process's C++ runtime (libstdc++).

On the lent GPU machines' image the default link of a torch extension put a static copy of
libstdc++ inside it; the first TORCH_CHECK message that formatted an integer then killed
the interpreter (bench/results/nvidia-h200/followup/segfault-stack.log).  csrc/build.py's
``link_flags`` names the process's libstdc++.so by path, and hetlora_kernels.cuda refuses a
module that still carries its own copy.  These tests build tiny shared libraries with g++
both ways (about a second each) and check the detector and the link fix on them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import hetlora_kernels.cuda as cuda_backend

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ (as the extension build does)")

_SRC = r"""
#include <cstring>
#include <sstream>
extern "C" int hetlora_fmt(char* out, int cap, long n) {
  std::ostringstream s;
  s << "n=" << n;
  std::strncpy(out, s.str().c_str(), cap);
  return static_cast<int>(s.str().size());
}
"""


def _build_config():
    spec = importlib.util.spec_from_file_location("hetlora_csrc_build_t", ROOT / "csrc" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shared_lib(tmp_path: Path, name: str, link: list[str]) -> Path:
    src = tmp_path / f"{name}.cpp"
    src.write_text(_SRC)
    out = tmp_path / f"lib{name}.so"
    r = subprocess.run(
        ["g++", "-O1", "-fPIC", "-shared", str(src), "-o", str(out), *link], capture_output=True, text=True
    )
    if r.returncode != 0 and "-static-libstdc++" in link and "libstdc++" in r.stderr:
        pytest.skip(f"this toolchain has no static libstdc++ to misuse: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    return out


def _fmt(path: Path, n: int) -> str:
    fn = ctypes.CDLL(str(path)).hetlora_fmt
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_long]
    buf = ctypes.create_string_buffer(64)
    fn(buf, 64, n)
    return buf.value.decode()


def test_cxx_runtime_is_the_loaded_libstdcxx():
    rt = _build_config().cxx_runtime()
    assert rt is not None and Path(rt).name.startswith("libstdc++.so") and Path(rt).exists()
    maps = Path("/proc/self/maps").read_text()
    assert rt in maps
    assert _build_config().link_flags()[-1] == rt


def test_a_dynamically_linked_library_is_accepted(tmp_path):
    lib = _shared_lib(tmp_path, "dyn", [])
    assert cuda_backend.carries_own_cxx_runtime(lib) is False
    assert _fmt(lib, 1234567) == "n=1234567"


def test_a_static_libstdcxx_copy_is_detected(tmp_path):
    lib = _shared_lib(tmp_path, "static", ["-static-libstdc++"])
    assert cuda_backend.carries_own_cxx_runtime(lib) is True


def test_link_flags_override_a_static_default(tmp_path):
    # -static-libstdc++ stands in for a toolchain whose default link is static (the GPU image)
    lib = _shared_lib(tmp_path, "fixed", ["-static-libstdc++", *_build_config().link_flags()[1:]])
    assert cuda_backend.carries_own_cxx_runtime(lib) is False
    assert _fmt(lib, -42) == "n=-42"


def test_the_built_extension_shares_the_runtime_and_keeps_numbers_in_messages():
    C = cuda_backend.extension()
    if C is None:
        pytest.skip(f"hetlora_kernels._C is not built: {cuda_backend.available('cpu')[1]}")
    assert cuda_backend.carries_own_cxx_runtime(C.__file__) is False
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    order, starts, offsets = torch.arange(6) + 97, torch.tensor([0, 2, 6]), torch.tensor([0, 1, 4])
    with pytest.raises(ValueError, match=r"order\[0\] = 97 is not a token index in \[0, 6\)"):
        C.shrink(x, w, order, starts, offsets, None, 1.0, 0, 3)


def test_a_module_with_its_own_runtime_is_refused(tmp_path):
    lib = _shared_lib(tmp_path, "refused", ["-static-libstdc++"])

    class Mod:
        __file__ = str(lib)

    with pytest.raises(RuntimeError, match=r"own copy of libstdc\+\+.*rebuild"):
        cuda_backend._checked(Mod())
    ok = _shared_lib(tmp_path, "ok", [])

    class Ok:
        __file__ = str(ok)

    assert isinstance(cuda_backend._checked(Ok()), Ok)


def test_without_a_loaded_runtime_the_soname_is_linked(tmp_path, monkeypatch):
    cfg = _build_config()
    monkeypatch.setattr(cfg, "cxx_runtime", lambda: None)
    flags = cfg.link_flags()
    assert flags[-1] == "-l:libstdc++.so.6"
    lib = _shared_lib(tmp_path, "soname", ["-static-libstdc++", flags[-1]])
    assert cuda_backend.carries_own_cxx_runtime(lib) is False
    assert _fmt(lib, 7) == "n=7"
