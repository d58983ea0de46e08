"""Plain truncated SVD: every matrix gets the same rank (differing by at most one) within the budget."""

from __future__ import annotations

import torch
from torch import nn

from ...factorize import (
    allocate,
    replace_with_kept_groups,
    svd_factorization,
    target_linears,
    target_shapes,
    target_weight,
    uniform_rank_scores,
)
from .config import SVDConfig


@torch.no_grad()
def compress_svd(model: nn.Module, config: SVDConfig, dataloader=None) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place) by their truncated SVD; return the module layout.

    ``dataloader`` is accepted for a uniform signature with the data-aware methods and is not used.
    """
    layers = target_linears(model, config.target_modules)
    shapes = target_shapes(layers)
    factorizations = [svd_factorization(target_weight(l)) for l in layers.values()]
    keep = allocate(uniform_rank_scores(shapes), shapes, config.target_budget, config.rank_multiple)
    return replace_with_kept_groups(model, layers, factorizations, keep, "svd", config.to_dict())
