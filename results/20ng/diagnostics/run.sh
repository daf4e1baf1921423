#!/usr/bin/env bash
# Diagnostics for the reduced-scale 20 Newsgroups grid (results/20ng/reproduce-reduced):
# why the strategies land so close together and why HetLoRA never pruned.  Same scale and
# seed-0 clients as the grid, Dir(0.5) and Dir(0.1):
#   headonly   HetLoRA with the LoRA learning rate at 1e-9: only the (FedAvg'd) classifier head learns
#   lam1       HetLoRA with λ = 1 (100x the default 0.01): does self-pruning fire, what does it cost
# Usage (from the repository root): bash results/20ng/diagnostics/run.sh [THREADS]
set -euo pipefail
T=${1:-1}
SCALE=(--num-clients 20 --clients-per-round 5 --rounds 12 --local-steps 5 --batch-size 8 --max-length 48
       --eval-every 3 --eval-samples 512 --export-clients 0 --no-plots --quiet --threads "$T" --seed 0)
for a in 0.5 0.1; do
  out=results/20ng/diagnostics/dir$a-s0
  hetlora simulate "${SCALE[@]}" --dirichlet-alpha $a --out-dir $out --run-name headonly --lr 1e-9 &
  hetlora simulate "${SCALE[@]}" --dirichlet-alpha $a --out-dir $out --run-name lam1 --lam 1.0
  wait
done
# lr10x: the LoRA learning rate 10x the default (3e-2), HetLoRA vs HomLoRA at r_min / r_max, Dir(0.5):
# does LoRA start to matter, and do the strategies separate once it does
out=results/20ng/diagnostics/dir0.5-s0
hetlora simulate "${SCALE[@]}" --dirichlet-alpha 0.5 --out-dir $out --run-name hetlora-lr3e-2 --lr 3e-2 &
hetlora simulate "${SCALE[@]}" --dirichlet-alpha 0.5 --out-dir $out --run-name homlora16-lr3e-2 --lr 3e-2 \
  --strategy homlora --hom-rank 16
wait
hetlora simulate "${SCALE[@]}" --dirichlet-alpha 0.5 --out-dir $out --run-name homlora2-lr3e-2 --lr 3e-2 \
  --strategy homlora --hom-rank 2
# the same pair on seed 1's clients
out=results/20ng/diagnostics/dir0.5-s1
hetlora simulate "${SCALE[@]}" --seed 1 --dirichlet-alpha 0.5 --out-dir $out --run-name hetlora-lr3e-2 --lr 3e-2 &
hetlora simulate "${SCALE[@]}" --seed 1 --dirichlet-alpha 0.5 --out-dir $out --run-name homlora16-lr3e-2 --lr 3e-2 \
  --strategy homlora --hom-rank 16
wait
