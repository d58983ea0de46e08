"""Rank allocations as a grid (layer x matrix type) and as a heat-map picture."""

from __future__ import annotations

import re

import numpy as np

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def split_matrix_name(name: str) -> tuple[int | None, str]:
    """``bert.encoder.layer.3.attention.self.query`` -> ``(3, "attention.self.query")``; without an index
    ``(None, name)``."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Row labels (layers), column labels (matrix types, in first-seen order) and the ranks (NaN where absent)."""
    cells = {split_matrix_name(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda l: (l is None, l))
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), rank in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = rank
    return ["other" if l is None else str(l) for l in layers], kinds, grid


def rank_heatmap_figure(ranks: dict[str, int], max_ranks: dict[str, int], title: str = ""):
    """Heat map of the kept rank per matrix; colour = kept fraction of the matrix's full rank, text = rank."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layer_labels, kinds, grid = rank_grid(ranks)
    _, _, full = rank_grid(max_ranks)
    fraction = grid / full
    fig, ax = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 0.45 * len(layer_labels) + 2.0))
    image = ax.imshow(fraction, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (row, col), rank in np.ndenumerate(grid):
        if not np.isnan(rank):
            ax.text(col, row, f"{int(rank)}", ha="center", va="center", fontsize=8,
                    color="white" if fraction[row, col] < 0.6 else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layer_labels)), layer_labels, fontsize=8)
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="kept rank / full rank")
    fig.tight_layout()
    return fig


def save_rank_heatmap(ranks: dict[str, int], max_ranks: dict[str, int], path: str, title: str = "") -> str:
    import matplotlib.pyplot as plt

    fig = rank_heatmap_figure(ranks, max_ranks, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
