"""Fisher-weighted SVD: the closed-form minimiser of the row-weighted reconstruction error.

With row weights ``d_i = sqrt(sum_j F_ij)`` (``F`` the element-wise empirical Fisher of the weight),
``min_{rank r} ||diag(d) (W - X)||_F`` is solved exactly by truncating the SVD of ``diag(d) W`` and
undoing the scaling: ``X = diag(1/d) U_r S_r V_r^T``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...factorize import (
    Factorization,
    allocate,
    fisher_information,
    replace_with_kept_groups,
    target_linears,
    target_shapes,
    target_weight,
    uniform_rank_scores,
)
from .config import FWSVDConfig


def row_weights(fisher: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """``sqrt`` of each output row's total Fisher information, floored relative to the mean."""
    rows = fisher.float().sum(dim=1)
    return (rows + floor * rows.mean().clamp_min(torch.finfo(rows.dtype).tiny)).sqrt()


def fisher_weighted_factorization(weight: torch.Tensor, row_weight: torch.Tensor) -> Factorization:
    W = weight.detach().float()
    U, s, Vh = torch.linalg.svd(row_weight[:, None] * W, full_matrices=False)
    return Factorization(U / row_weight[:, None], s, Vh)


def row_weighted_error(weight: torch.Tensor, approx: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    return (row_weight[:, None] * (weight.float() - approx.float())).square().sum()


def fwsvd_factorizations(
    layers: dict[str, nn.Module], fisher: dict[str, torch.Tensor], floor: float
) -> list[Factorization]:
    return [fisher_weighted_factorization(target_weight(l), row_weights(fisher[n], floor)) for n, l in layers.items()]


@torch.no_grad()
def compress_fwsvd(model: nn.Module, config: FWSVDConfig, dataloader) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place, ideally already fine-tuned on the task) by their
    Fisher-weighted SVD at near-uniform rank; return the module layout."""
    layers = target_linears(model, config.target_modules)
    with torch.enable_grad():
        fisher = fisher_information(model, dataloader, layers, config.max_fisher_batches)
    shapes = target_shapes(layers)
    factorizations = fwsvd_factorizations(layers, fisher, config.fisher_floor)
    keep = allocate(uniform_rank_scores(shapes), shapes, config.target_budget, config.rank_multiple)
    return replace_with_kept_groups(model, layers, factorizations, keep, "fwsvd", config.to_dict())
