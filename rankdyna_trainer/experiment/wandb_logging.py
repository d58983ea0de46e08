"""Weights & Biases views of a RankDyna run: rank heat maps over time, the final rank pattern, the exported size.

The scalar budget keys (``rankdyna/budget_params``, ``rankdyna/params``, ``rankdyna/params_fraction``) are put
into the Trainer's ``logs`` by :class:`~rankdyna_trainer.RankDynaCallback` and reach W&B through transformers'
own ``WandbCallback``; this module adds what does not fit a scalar chart. Everything here is a no-op when no
W&B run is active (``--report_to`` without ``wandb``).
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

from ..methods.rankdyna import gated_layers, rank_pattern
from .rank_plots import rank_heatmap_figure, split_matrix_name

HEATMAP_KEY = "rankdyna/rank_heatmap"
RANK_TABLE_KEY = "rankdyna/rank_pattern"


def active_wandb_run():
    """The current W&B run, or None (wandb not installed or no run started)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def full_ranks(model) -> dict[str, int]:
    """Groups each gated layer has when nothing is pruned: ``min(m, n)`` of a matrix, the channels of an FFN."""
    return {name: layer.full_rank for name, layer in gated_layers(model).items()}


class RankDynaWandbCallback(TrainerCallback):
    """Logs, on every logging step, the rank per matrix as a heat map image (layer x matrix type; W&B's media
    slider steps through them over training) and, at the end of training, the final rank pattern as a table."""

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        run = active_wandb_run()
        ranks = rank_pattern(model) if model is not None else {}
        if run is None or not ranks or not state.is_world_process_zero:
            return
        import matplotlib.pyplot as plt
        import wandb

        fig = rank_heatmap_figure(ranks, full_ranks(model), title=f"kept rank per matrix, step {state.global_step}")
        run.log({HEATMAP_KEY: wandb.Image(fig), "train/global_step": state.global_step})
        plt.close(fig)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        run = active_wandb_run()
        ranks = rank_pattern(model) if model is not None else {}
        if run is None or not ranks or not state.is_world_process_zero:
            return
        run.log({RANK_TABLE_KEY: rank_pattern_table(ranks, full_ranks(model)), "train/global_step": state.global_step})


def rank_pattern_table(ranks: dict[str, int], max_ranks: dict[str, int]):
    import wandb

    rows = []
    for name, rank in ranks.items():
        layer, kind = split_matrix_name(name)
        rows.append([name, -1 if layer is None else layer, kind, rank, max_ranks[name]])
    return wandb.Table(columns=["matrix", "layer", "matrix_type", "rank", "full_rank"], data=rows)


def log_exported_model(save_directory: str, compressed_params: int, dense_params: int) -> None:
    """Exported model size into the active run's summary (and history, so it shows as a chart too)."""
    run = active_wandb_run()
    if run is None:
        return
    weights = [f for f in os.listdir(save_directory) if f.endswith(".safetensors")]
    size_mb = sum(os.path.getsize(os.path.join(save_directory, f)) for f in weights) / 2**20
    values = {
        "export/compressed_params": compressed_params,
        "export/dense_params": dense_params,
        "export/params_fraction": compressed_params / dense_params,
        "export/model_file_mb": size_mb,
    }
    run.log(values)
    run.summary.update(values)
