"""bench/gpu_all.sh's plumbing, on a CPU (its dry run), as a lent GPU would see it.

A lent GPU machine runs the project with its own Python, which lacks flwr and opacus, and the
device tool brings back at most 8 files from ``$OUT``.  The dry run (smoke presets, device
cpu, test files only collected) runs here with flwr and opacus made unimportable; the test
checks that every stage passes, that ``$OUT`` holds a handful of files with everything
packed in one archive, and that the committed results of this CPU are left alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BLOCK = '''
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("flwr", "opacus"):
            raise ModuleNotFoundError(f"No module named {name!r} (not on a lent GPU's Python)")
        return None
sys.meta_path.insert(0, _Block())
'''


def test_gpu_all_dry_run_packs_everything_into_out(tmp_path: Path) -> None:
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK)
    out = tmp_path / "out"
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").rglob("*") if p.is_file()}
    env = dict(os.environ, HETLORA_GPU_ALL_DRYRUN="1", OUT=str(out), PYTHONPATH=str(block))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", "bench/gpu_all.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files  # the device tool's limit
    slug = next(f[: -len(".tar.gz")] for f in files if f.endswith(".tar.gz"))
    assert {"summary.txt", "kernels.md", "e2e.md", "serve.md", "profile.md"} <= set(files)
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "build", "tests", "profile", "kernels", "e2e", "serve"):
        assert f"{stage:<10} rc=0" in summary, summary
    with tarfile.open(out / f"{slug}.tar.gz") as tar:
        names = set(tar.getnames())
        kernels = json.load(tar.extractfile(f"{slug}/kernels.json"))
    assert {f"{slug}/{f}" for f in ("e2e.json", "serve.json", "pytest-backends.xml", "tests.log",
                                   "profile.json")} <= names
    assert any(n.startswith(f"{slug}/profile_lora_linear_fwd_bwd_") for n in names)  # the host-side tables
    assert kernels["rows"] and not [x for x in kernels["rows"] if x.get("status") == "error"]
    # the test files were collected with flwr/opacus missing: no collection error
    assert "error" not in (out / "summary.txt").read_text().lower()
    with tarfile.open(out / f"{slug}.tar.gz") as tar:
        tests_log = tar.extractfile(f"{slug}/tests.log").read().decode()
    last = tests_log.strip().splitlines()[-1]
    assert re.search(r"\d+ tests collected", last) and "error" not in last, last
    assert "ERROR collecting" not in tests_log and "ModuleNotFoundError" not in tests_log
    # the GPU files, not the CPU emulation of the CUDA kernels (no GPU needed for those)
    assert "test_cuda_backend.py" in tests_log and "test_triton_lora.py" in tests_log
    assert "test_cuda_emu.py" not in tests_log
    assert "test_cxx_runtime.py" in tests_log  # the libstdc++ check runs where the GPU build is
    after = {p: p.stat().st_mtime_ns for p in (REPO / "bench" / "results").rglob("*") if p.is_file()}
    assert after == committed, "the dry run wrote into bench/results"


def test_a_rerun_packs_only_its_own_results(tmp_path: Path) -> None:
    """A lend's rerun of chosen stages: ``HETLORA_GPU_BUILD=0`` skips the build,
    ``HETLORA_GPU_TESTS`` narrows the tests, and what an earlier lend left in the results folder
    (the checkout's committed files travel with it) stays there but is not packed: neither a
    file of the folder (a stale ``kernels.md`` is not copied beside the pack either) nor an
    older lend's subfolder."""
    env_py = dict(os.environ)
    env_py.pop("TRITON_INTERPRET", None)
    slug = subprocess.run([".venv/bin/python" if (REPO / ".venv/bin/python").exists() else "python", "-c",
                           "from bench.common import device_slug; print(device_slug('cpu'))"], cwd=REPO, env=env_py,
                          capture_output=True, text=True, check=True).stdout.strip()
    root, out = tmp_path / "results", tmp_path / "out"
    (root / slug / "lend9-abc").mkdir(parents=True)
    (root / slug / "profile_stale.txt").write_text("an earlier lend's")
    (root / slug / "kernels.md").write_text("an earlier lend's")
    (root / slug / "lend9-abc" / "kept.txt").write_text("an older lend's folder")
    env = dict(env_py, HETLORA_GPU_ALL_DRYRUN="1", OUT=str(out), HETLORA_GPU_RESULTS=str(root),
               HETLORA_GPU_STAGES="tests", HETLORA_GPU_BUILD="0", HETLORA_GPU_TESTS="tests/test_gpu_all.py")
    r = subprocess.run(["bash", "bench/gpu_all.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "tests      rc=0" in summary and "build" not in summary, summary
    assert (root / slug / "profile_stale.txt").exists() and (root / slug / "lend9-abc" / "kept.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == [f"{slug}.tar.gz", "summary.txt"]
    with tarfile.open(out / f"{slug}.tar.gz") as tar:
        names = set(tar.getnames())
        tests_log = tar.extractfile(f"{slug}/tests.log").read().decode()
    assert names == {f"{slug}/{f}" for f in ("summary.txt", "env.log", "tests.log", "pytest-backends.xml")}, names
    assert "test_gpu_all.py" in tests_log and "test_triton_lora.py" not in tests_log
