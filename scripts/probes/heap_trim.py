"""One-off probe: run a repo script with ``host_memory.TRIM_GROWTH`` set (0: trim freed heap at every reallocation,
inf: only the first time). The runs behind docs/cost.md's heap-trim figures:

    python scripts/probes/heap_trim.py 0 scripts/benchmark_glue.py --no_report --methods rankdyna --seeds 42 \\
        --tasks cola --budgets 0.2 --results_dir benchmarks/glue_heap_trim/trim_every_reallocation
    python scripts/probes/heap_trim.py 0 scripts/run_glue.py <the main job's flags> --rankdyna --rankdyna_budget 0.2
"""
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from rankdyna_trainer import host_memory  # noqa: E402

if len(sys.argv) < 3:
    sys.exit("usage: heap_trim.py GROWTH SCRIPT [ARGS...]")
host_memory.TRIM_GROWTH = float(sys.argv[1])
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
