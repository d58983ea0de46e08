"""What scripts/run_glue.py and the benchmarks build on: GLUE data and metrics, W&B logging, rank plots, sweeps.

Not needed to compress a model in your own Trainer; the package root holds that core.
"""
