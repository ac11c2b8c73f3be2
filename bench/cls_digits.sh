#!/usr/bin/env bash
# Full classification-unlearning benchmark on scikit-learn digits (offline): every method x 5 seeds,
# random 10% forgetting and class-wise forgetting of class 3. Resumable: rerun to finish a killed run.
#   bash bench/cls_digits.sh                 # writes bench/results/cls/{digits_random10,digits_class3}
#   CACHE=/tmp/fresh bash bench/cls_digits.sh   # cold cache: also times the original models' training
set -euo pipefail
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no OpenMP busy-waiting on a shared 2-core machine
OUT=${OUT:-bench/results/cls}
CACHE=${CACHE:-$HOME/.cache/salun-erasure/cls}
THREADS=${THREADS:-1}   # a small CNN on 8x8 images is fastest on one thread, and robust on a busy machine
SEEDS=${SEEDS:-5}
start=$(date +%s)
python -m erasure.classification.cli bench --dataset digits --scenario random --forget-fraction 0.1 \
  --methods all --seeds "$SEEDS" --threads "$THREADS" --cache-dir "$CACHE" --out "$OUT/digits_random10"
python -m erasure.classification.cli bench --dataset digits --scenario class --forget-class 3 \
  --methods all --seeds "$SEEDS" --threads "$THREADS" --cache-dir "$CACHE" --out "$OUT/digits_class3"
end=$(date +%s)
echo "total wall time: $((end - start)) s"
