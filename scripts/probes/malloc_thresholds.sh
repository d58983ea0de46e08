#!/usr/bin/env bash
# One-off probe: the main job (scripts/bench_cost.py's MiniLM cell) dense and at budget 0.2, with glibc's default
# (moving) mmap/trim thresholds and with both fixed, one run after the other. Behind docs/cost.md's glibc figures.
#   bash scripts/probes/malloc_thresholds.sh            # default dense, default 0.2, fixed 0.2, fixed dense
#   bash scripts/probes/malloc_thresholds.sh reversed   # fixed 0.2, default 0.2, default dense (into pair2_*)
set -euo pipefail
cd "$(dirname "$0")/../.."
FIXED=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296)
if [ "${1:-}" = reversed ]; then
  cells=("pair2_fixed_thresholds minilm:0.2:time" "pair2_default minilm:0.2:time" "pair2_default minilm:dense:time")
else
  cells=("default minilm:dense:time" "default minilm:0.2:time" "fixed_thresholds minilm:0.2:time"
         "fixed_thresholds minilm:dense:time")
fi
for cell in "${cells[@]}"; do
  set -- $cell
  mkdir -p "benchmarks/cost_malloc/$1"
  if [[ "$1" == *fixed_thresholds ]]; then prefix=(env "${FIXED[@]}"); else prefix=(env); fi
  "${prefix[@]}" python scripts/bench_cost.py --child "$2" --results_dir "benchmarks/cost_malloc/$1"
done
