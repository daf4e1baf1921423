"""The cached Triton launch path (`hetlora_kernels.triton.launch`, ``FAST_LAUNCH``, the default) hands
Triton's C launcher exactly what Triton's own path hands it.

Without a GPU this runs Triton's real Python launch path against a stand-in driver whose
"compiled kernels" record their launches (``tests/fast_launch_probe.py``, in a process without
``TRITON_INTERPRET``): for every LoRA kernel and a server kernel, two dtypes, widths that do and
do not keep rows 16-byte aligned, float and tensor scales, direct and chunked weight gradients,
the same call is made on Triton's path, on the fast path's first call (a miss, which goes
through Triton) and on its second (a hit), and the three records must be equal: the same
compiled kernel (Triton compiles one per specialisation, so a reused kernel of other
alignments would show), grid, stream and arguments.  On a GPU every kernel test runs through
it.  A Triton it does not fit (no ``triton.knobs``, a C launcher taking other arguments) gets
Triton's own path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _no_interpreter_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def probe() -> dict:
    res = subprocess.run([sys.executable, "-W", "ignore", str(HERE / "fast_launch_probe.py")],
                         env=_no_interpreter_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    if "unsupported" in out:
        pytest.skip(out["unsupported"])
    return out


def test_fast_path_launches_what_triton_launches(probe):
    calls = probe["calls"]
    assert len(calls) == 36
    for name, rec in calls.items():
        slow = rec["slow"]
        assert isinstance(slow, list) and slow, (name, slow)
        assert rec["fast-miss"] == slow, name
        assert rec["fast-hit"] == slow, name
        n = len(slow)  # and the second call really took the cached path (launch.STATS)
        assert rec["slow:stats"] == {"hits": 0, "misses": 0, "fallbacks": 0}, name
        miss = rec["fast-miss:stats"]  # a key an earlier case made already hits (d = 64: rows stay aligned)
        assert miss["hits"] + miss["misses"] == n and miss["fallbacks"] == 0, name
        assert rec["fast-hit:stats"] == {"hits": n, "misses": 0, "fallbacks": 0}, name


def test_the_key_tells_alignments_apart(probe):
    """bf16 rows of width 17 start 34 bytes apart: row 1 on is not 16-byte aligned, row 0 on
    is, and Triton compiles the two apart; the fast path must not hand one the other's kernel."""
    calls = probe["calls"]
    kernel = {name: rec["slow"][0][0] for name, rec in calls.items()}
    assert kernel["shrink-bfloat16-d17"] != kernel["shrink-aligned-bfloat16-d17"]
    assert calls["shrink-aligned-bfloat16-d17"]["fast-hit"] == calls["shrink-aligned-bfloat16-d17"]["slow"]


def test_launch_is_the_plain_launch_when_off_or_not_a_kernel(monkeypatch):
    from hetlora_kernels.triton import launch

    class Spy:
        def __getitem__(self, grid):
            return ("plain", grid)

    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    assert launch.launch(Spy(), (3,)) == ("plain", (3,))
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    assert launch.launch(Spy(), (3,)) == ("plain", (3,))  # a spy is no Triton kernel (and tests interpret)


def test_profile_calibration_kernel_compiles():
    """bench profile's empty calibration kernel lowers for sm_90 (the H100 lend's calibration
    failed to compile: its ``tl`` was a local name, and Triton resolves names in the module)."""
    code = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from bench.profile import calibration_kernels\n"
        "noop, tuned = calibration_kernels()\n"
        "sig = {a: ('constexpr' if a == 'N' else ('*fp32' if a in 'abcdef' else 'i32')) for a in noop.arg_names}\n"
        "ck = triton.compile(ASTSource(noop, sig, constexprs={'N': 16}), target=GPUTarget('cuda', 90, 32))\n"
        "print('ok', ck.metadata.name)\n"
    )
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=_no_interpreter_env(), cwd=HERE.parent,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok _noop"), res.stdout


def test_pinned_configs_launch_each_tuned_kernel_with_its_first_config(probe):
    """`hetlora_kernels.pinned_kernel_configs` (FedConfig.deterministic): on Triton's path and on
    the fast path alike, every autotuned kernel launches with its first config's block sizes and
    warps, although the autotuner (timing rigged: the last config wins) picked another; after the
    block, the autotuner's pick again."""
    tuned = probe["tuned"]
    assert tuned and all(len(c) > 1 for c in tuned.values())
    pinned_somewhere = differs = 0
    for name, rec in probe["calls"].items():
        for mode in ("pinned", "pinned-fast"):
            launches = rec[mode]
            assert isinstance(launches, list) and launches, (name, mode, launches)
            for kernel, chosen in launches:
                if kernel not in tuned:  # a kernel with one config (the reductions' second pass)
                    continue
                first = tuned[kernel][0]
                assert {k: chosen.get(k) for k in first} == first, (name, mode, kernel, chosen, first)
                pinned_somewhere += 1
        for kernel, chosen in rec["unpinned"]:
            if kernel in tuned:
                first = tuned[kernel][0]
                differs += {k: chosen.get(k) for k in first} != first
    assert pinned_somewhere and differs  # the pin changed what would have launched


def _tiny_launcher(monkeypatch):
    """A `_Launcher` over a real (never compiled) JITFunction, its Triton path replaced by a spy,
    and a stand-in driver (device 0, stream 7)."""
    import triton.language as tl
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from hetlora_kernels.triton import launch

    def _k(x_ptr, n, BLOCK: tl.constexpr):
        pass

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 7

    monkeypatch.setattr(driver, "_active", Driver(), raising=False)
    monkeypatch.setattr(type(driver), "active", property(lambda self: self._active), raising=False)
    launcher = launch._Launcher(JITFunction(_k))  # JITFunction itself: the interpreter's switch bypassed
    calls: list = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    launcher.kernel = Spy()
    return launch, launcher, calls


def test_a_triton_without_knobs_takes_tritons_own_path(monkeypatch):
    """Triton before 3.4 has no ``triton.knobs`` (where the fast path looks for launch hooks):
    every launch then goes through Triton's own path instead of failing."""
    import triton

    from hetlora_kernels.triton import launch as launch_mod

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)
    launch_mod._knobs.cache_clear()  # (looked up once per process)
    try:
        launch, launcher, calls = _tiny_launcher(monkeypatch)
        before = dict(launch.STATS)
        x = __import__("torch").zeros(4)
        for _ in range(2):
            launcher((1,), (x, 4), {"BLOCK": 16})
        assert len(calls) == 2 and not launcher.usable
        assert launch.STATS["fallbacks"] - before["fallbacks"] == 2 and launch.STATS["hits"] == before["hits"]
    finally:  # Triton's knobs back, and looked up afresh by the tests after this one
        monkeypatch.undo()
        launch_mod._knobs.cache_clear()


def test_a_c_launcher_that_rejects_its_arguments_sends_the_kernel_back_to_triton(monkeypatch):
    """A Triton whose compiled launcher takes other arguments raises TypeError before launching:
    that launch and every later one of the kernel go through Triton's path."""
    launch, launcher, calls = _tiny_launcher(monkeypatch)
    x = __import__("torch").zeros(4)

    class Compiled:
        function, packed_metadata = object(), object()

        def run(self, *a):
            raise TypeError("function takes exactly 14 arguments (12 given)")

    launcher.cache[launch._key(0, (x, 4), {"BLOCK": 16})] = launch._Entry(Compiled(), {}, [16])
    before = dict(launch.STATS)

    def grid(meta):
        return (2,)

    with pytest.warns(RuntimeWarning, match="rejected its arguments.*14 arguments"):
        launcher(grid, (x, 4), {"BLOCK": 16})
    launcher(grid, (x, 4), {"BLOCK": 16})
    assert [c[0] for c in calls] == [grid, grid] and not launcher.usable  # Triton gets the caller's grid
    assert launch.STATS["fallbacks"] - before["fallbacks"] == 2 and launch.STATS["hits"] == before["hits"]
