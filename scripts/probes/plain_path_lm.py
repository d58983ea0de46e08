"""One-off probe: scripts/benchmark_lm.py with every RankDyna layer on the plain, all-groups path (KeptCompute's
max_kept_fraction 0), for docs/DECODER.md's rounding-order figure:

    python scripts/probes/plain_path_lm.py --methods rankdyna --budgets 0.5 --seeds 0 --runs-dir /tmp/lm_plain \\
        --results-json /tmp/lm_plain.json --out /tmp/lm_plain.md
"""
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from rankdyna_trainer.methods.rankdyna import kept_compute  # noqa: E402

kept_compute.KeptCompute.__init__.__defaults__ = (0.0,)
sys.argv = ["benchmark_lm.py"] + sys.argv[1:]
runpy.run_path(os.path.join(REPO, "scripts", "benchmark_lm.py"), run_name="__main__")
