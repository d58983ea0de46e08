#!/usr/bin/env bash
# One-off probe: the main job (scripts/bench_cost.py's MiniLM cell) dense and at budget 0.2, with glibc's default
# (moving) mmap/trim thresholds and with both fixed, one run after the other. Behind docs/cost.md's glibc figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p benchmarks/cost_malloc/default benchmarks/cost_malloc/fixed_thresholds
FIXED=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296)
for cell in "default minilm:dense:time" "default minilm:0.2:time" "fixed_thresholds minilm:0.2:time" \
            "fixed_thresholds minilm:dense:time"; do
  set -- $cell
  if [ "$1" = fixed_thresholds ]; then prefix=(env "${FIXED[@]}"); else prefix=(env); fi
  "${prefix[@]}" python scripts/bench_cost.py --child "$2" --results_dir "benchmarks/cost_malloc/$1"
done
