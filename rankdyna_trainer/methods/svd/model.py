"""Plain truncated SVD: every matrix gets the same rank (differing by at most one) within the budget."""

from __future__ import annotations

import torch
from torch import nn

from ...factorize import allocate, replace_with_kept_groups, svd_factorization, target_linears, uniform_rank_scores
from .config import SVDConfig


@torch.no_grad()
def compress_svd(model: nn.Module, config: SVDConfig, dataloader=None) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place) by their truncated SVD; return the module layout.

    ``dataloader`` is accepted for a uniform signature with the data-aware methods and is not used.
    """
    layers = target_linears(model, config.target_modules)
    shapes = [tuple(l.weight.shape) for l in layers.values()]
    factorizations = [svd_factorization(l.weight) for l in layers.values()]
    keep = allocate(uniform_rank_scores(shapes), shapes, config.target_budget)
    return replace_with_kept_groups(model, layers, factorizations, keep)
