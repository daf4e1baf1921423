#!/usr/bin/env bash
# Compile every .cu under csrc/ with the installed nvcc, for sm_80 and sm_90 (plus
# sm_90a for files that declare `// hetlora: sm_90a`), -c to object files in a temp dir.
# The .cu files include no torch headers, so this needs nvcc alone (~1.5 s per file and arch).
#
# Usage: scripts/check_cuda_compile.sh [--bindings]
#   --bindings  also syntax-check the torch-facing C++ with WITH_CUDA defined
#               (csrc/bindings.cpp, csrc/cuda/bindings_cuda.cpp) against the installed
#               torch's headers and the CUDA toolkit's; ~20 s; needs python with torch.
# Exit codes: 0 all compiled; 1 a compile failed; 3 nvcc is not installed (the pytest
# wrapper turns 3 into a skip carrying this script's message).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found on PATH (set NVCC=/path/to/nvcc); CUDA kernels not compile-checked"
  exit 3
fi
echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The -D flags are the ones torch's CUDAExtension passes to nvcc (no implicit half/bf16
# conversions), so a kernel that compiles here also compiles inside the real build.
FLAGS=(-std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-warn-spills -Werror=all-warnings -Icsrc -Icsrc/cuda
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)
mapfile -t FILES < <(find csrc -name '*.cu' | sort)
if [ "${#FILES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under csrc/"
  exit 1
fi

fail=0
n=0
for f in "${FILES[@]}"; do
  archs=(80 90)
  if grep -q 'hetlora: sm_90a' "$f"; then archs+=(90a); fi
  # one nvcc call per file with every target: the host side is compiled once
  gencode=()
  for a in "${archs[@]}"; do gencode+=("-gencode=arch=compute_$a,code=sm_$a"); done
  obj="$TMP/$(basename "$f" .cu).o"
  t0=$(date +%s%N)
  if out=$("$NVCC" "${FLAGS[@]}" "${gencode[@]}" -c "$f" -o "$obj" 2>&1); then
    ms=$((($(date +%s%N) - t0) / 1000000))
    for a in "${archs[@]}"; do printf 'ok    %-40s sm_%-4s (%d ms for all targets)\n' "$f" "$a" "$ms"; done
    n=$((n + ${#archs[@]}))
  else
    printf 'FAIL  %-40s %s\n%s\n' "$f" "${archs[*]/#/sm_}" "$out"
    fail=1
  fi
done

if [ "${1:-}" = "--bindings" ]; then
  PY=${PYTHON:-python3}
  [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
  if ! TORCH_DIR=$("$PY" -c "import torch, os; print(os.path.dirname(torch.__file__))" 2>/dev/null); then
    echo "check_cuda_compile: --bindings needs python with torch ($PY has none)"
    exit 1
  fi
  PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  # the toolkit's include dir: nvcc may be a wrapper script, so ask nvcc itself (TOP=) too
  CUDA_INC=""
  top=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$top" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" \
      /usr/local/cuda; do
    if [ -n "$c" ] && [ -f "$c/include/cuda_runtime.h" ]; then CUDA_INC="$c/include"; break; fi
  done
  if [ -z "$CUDA_INC" ]; then
    echo "check_cuda_compile: --bindings could not find the CUDA toolkit's include directory (set CUDA_HOME)"
    exit 1
  fi
  # A CPU-only torch ships the c10/cuda headers but not the one its CMake generates.
  mkdir -p "$TMP/stub/c10/cuda/impl"
  if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$TMP/stub/c10/cuda/impl/cuda_cmake_macros.h"
  fi
  for f in csrc/bindings.cpp csrc/cuda/bindings_cuda.cpp; do
    if out=$(${CXX:-g++} -std=c++20 -fsyntax-only -DWITH_CUDA -DTORCH_EXTENSION_NAME=_C -I"$TMP/stub" -Icsrc \
        -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" -I"$CUDA_INC" -I"$PY_INC" "$f" 2>&1); then
      echo "ok    $f (syntax, WITH_CUDA)"
    else
      printf 'FAIL  %s (syntax, WITH_CUDA)\n%s\n' "$f" "$out"
      fail=1
    fi
  done
fi

if [ "$fail" -ne 0 ]; then
  echo "check_cuda_compile: FAILED"
  exit 1
fi
echo "check_cuda_compile: $n file x target compiles ok"
