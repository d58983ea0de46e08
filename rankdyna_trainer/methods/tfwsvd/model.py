"""Element-wise Fisher-weighted low-rank approximation, solved numerically.

Minimises ``sum_ij F_ij (W_ij - (L R)_ij)^2`` over ``L`` (out x r) and ``R`` (r x in), which has no closed
form once the weights vary within rows. Alternating weighted least squares: with ``R`` fixed each row of
``L`` is a small ``r x r`` weighted least-squares problem, and likewise each column of ``R``; both are
solved batched. Starting from FWSVD and keeping the best iterate, the objective never ends above FWSVD's.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ...factorize import (
    Factorization,
    allocate,
    fisher_information,
    replace_with_kept_groups,
    svd_factorization,
    target_linears,
    target_shapes,
    target_weight,
    uniform_rank_scores,
)
from ...quantizer import record_compression
from ..fwsvd.model import fisher_weighted_factorization, row_weights
from .config import TFWSVDConfig


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """The element-wise Fisher-weighted reconstruction error ``sum F * (W - X)^2``."""
    return (fisher * (weight.float() - approx.float()).square()).sum()


def _solve_rows(target: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor, ridge: float, chunk: int):
    """For each row ``i``: ``argmin_x sum_j weights[i, j] (target[i, j] - x . basis[:, j])^2`` (basis is r x k)."""
    rank = basis.shape[0]
    eye = torch.eye(rank, dtype=basis.dtype, device=basis.device)
    out = torch.empty(target.shape[0], rank, dtype=basis.dtype, device=basis.device)
    for start in range(0, target.shape[0], chunk):
        w = weights[start:start + chunk]
        weighted_basis = basis[None] * w[:, None, :]  # chunk x r x k
        gram = weighted_basis @ basis.T  # chunk x r x r
        rhs = weighted_basis @ target[start:start + chunk, :, None]  # chunk x r x 1
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(basis.dtype).tiny)
        gram = gram + (ridge * scale)[:, None, None] * eye
        out[start:start + chunk] = torch.linalg.solve(gram, rhs).squeeze(-1)
    return out


def weighted_low_rank(
    weight: torch.Tensor, fisher: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
    iterations: int = 5, ridge: float = 1e-6, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating weighted least squares from ``(left, right)``; returns the best ``(L, R)`` seen."""
    W, F = weight.detach().float(), fisher.float()
    F = F / F.mean().clamp_min(torch.finfo(F.dtype).tiny)  # the scale of F does not change the minimiser
    L, R = left.float().clone(), right.float().clone()
    best = (weighted_error(W, L @ R, F), L, R)
    for _ in range(iterations):
        L = _solve_rows(W, F, R, ridge, chunk)
        R = _solve_rows(W.T, F.T, L.T, ridge, chunk).T
        error = weighted_error(W, L @ R, F)
        if error < best[0]:
            best = (error, L, R)
    return best[1], best[2]


def factorization_of_product(left: torch.Tensor, right: torch.Tensor) -> Factorization:
    """The SVD of ``left @ right`` from thin QRs of the factors (cheap: only an ``r x r`` SVD)."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    return Factorization(q_left @ u, s, vh @ q_right.T)


def svd_risk(weight: torch.Tensor, fisher: torch.Tensor, rank: int, tfwsvd_weight: torch.Tensor) -> dict:
    """Per-matrix diagnostics of how much plain SVD loses on what the task cares about.

    ``fisher_row_cv``: coefficient of variation of the rows' total Fisher information, computable before any
    factorization; plain SVD weighs all rows alike, so the more uneven the rows, the more it misplaces its
    error. ``svd_excess_error``: Fisher-weighted error of plain SVD divided by TFWSVD's at the same rank
    (1 = plain SVD loses nothing on the weighted objective; larger = plain SVD hurts).
    """
    F = fisher.float()
    rows = F.sum(dim=1)
    svd_weight = svd_factorization(weight).weight(torch.arange(min(weight.shape)) < rank)
    tf_error = weighted_error(weight, tfwsvd_weight, F).clamp_min(torch.finfo(F.dtype).tiny)
    return {
        "rank": int(rank),
        "fisher_row_cv": float(rows.std() / rows.mean().clamp_min(torch.finfo(F.dtype).tiny)),
        "svd_excess_error": float(weighted_error(weight, svd_weight, F) / tf_error),
    }


@torch.no_grad()
def compress_tfwsvd(model: nn.Module, config: TFWSVDConfig, dataloader) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place) by their element-wise Fisher-weighted low-rank
    approximation at FWSVD's ranks; return the module layout, each entry carrying its ``svd_risk``."""
    layers = target_linears(model, config.target_modules)
    with torch.enable_grad():
        fisher = fisher_information(model, dataloader, layers, config.max_fisher_batches)
    shapes = target_shapes(layers)
    keep = allocate(uniform_rank_scores(shapes), shapes, config.target_budget, config.rank_multiple)
    factorizations, risks = [], []
    for (name, linear), kept in tqdm(list(zip(layers.items(), keep)), desc="Weighted low-rank (ALS)"):
        F = fisher[name] + config.fisher_floor * fisher[name].mean()
        weight = target_weight(linear)
        start = fisher_weighted_factorization(weight, row_weights(fisher[name], config.fisher_floor))
        rank = int(kept.sum())
        left, right = start.factors(torch.arange(len(kept)) < rank)
        if rank > 0:
            left, right = weighted_low_rank(weight, F, left, right, config.als_iterations, config.ridge,
                                            config.row_chunk)
        fact = factorization_of_product(left, right) if rank > 0 else start
        factorizations.append(fact)
        risks.append(svd_risk(weight, F, rank, left @ right))
    ranked = [torch.arange(len(f.s)) < int(k.sum()) for f, k in zip(factorizations, keep)]
    modules = replace_with_kept_groups(model, layers, factorizations, ranked, "tfwsvd", config.to_dict())
    for entry, risk in zip(modules.values(), risks):
        entry["diagnostics"] = risk
    return record_compression(model, modules, "tfwsvd", config.to_dict())
