"""Post-training compression without fine-tuning: (activation-weighted) truncated SVD and LoRAP."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import matrix_cost
from ...calibration import blockwise
from ...export import describe_module, factorized_or_dense, sliced_linear
from ...factorize import svd_factorization
from ...quantizer import record_compression
from ...targets import (
    find_target_linears,
    is_conv1d,
    linear_shape,
    linear_weight,
    module_role,
    set_submodule,
    unwrap_model,
)
from .config import ROLES, LoRAPConfig, LowRankSVDConfig


def uniform_rank(budget_fraction: float, out_features: int, in_features: int) -> int:
    """Largest rank whose storage cost is within ``budget_fraction`` of the dense matrix."""
    dense = out_features * in_features
    if budget_fraction >= 1.0:
        return min(out_features, in_features)
    return min(int(budget_fraction * dense) // (out_features + in_features), min(out_features, in_features))


def svd_factors(weight: torch.Tensor, rank: int, input_rms: torch.Tensor | None = None):
    """``(left, right)`` with ``left @ right`` the best rank-``rank`` approximation of ``weight``, measured on the
    inputs when ``input_rms`` is given (see :func:`~rankdyna_trainer.factorize.svd_factorization`)."""
    factorization = svd_factorization(weight, input_rms)
    left, right = factorization.factors(torch.arange(factorization.s.numel()) < rank)
    return left.to(weight.dtype), right.to(weight.dtype)


def _replace_by_factors(model: nn.Module, name: str, rank: int, input_rms: torch.Tensor | None) -> None:
    linear = model.get_submodule(name)
    left, right = svd_factors(linear_weight(linear), rank, input_rms)
    bias = linear.bias.detach() if linear.bias is not None else None
    set_submodule(model, name, factorized_or_dense(left, right, bias, conv1d=is_conv1d(linear)))


@torch.no_grad()
def compress_svd(model: nn.Module, config: LowRankSVDConfig,
                 calibration_batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, dict]:
    """Factorize every targeted matrix (in place) at the uniform budget; returns the export layout."""
    model = unwrap_model(model)
    targets = find_target_linears(model, config.target_modules)
    ranks = {n: uniform_rank(config.target_budget, *linear_shape(l)) for n, l in targets.items()}
    if config.activation_weighted:
        if not calibration_batches:
            raise ValueError("activation_weighted=True needs calibration_batches (token-id batches of sample text).")

        def compress_block(block, names, mean_squares):
            for n in names:
                _replace_by_factors(model, n, ranks[n], mean_squares[n].sqrt())

        blockwise(model, targets, calibration_batches, compress_block, desc="Activation-weighted SVD")
    else:
        for n in tqdm(targets, desc="SVD", disable=len(targets) < 50):
            _replace_by_factors(model, n, ranks[n], None)
    modules = {n: describe_module(model.get_submodule(n)) for n in targets}
    method = "activation_weighted_svd" if config.activation_weighted else "uniform_svd"
    return record_compression(model, modules, method, config.to_dict())


def attention_ranks(shapes: dict[str, tuple[int, int]], weights: dict[str, float],
                    budget_params: float) -> dict[str, int]:
    """Ranks ``r * weights[name]`` (capped at full rank) for the largest ``r`` whose total cost fits the budget."""
    full = {n: min(m, k) for n, (m, k) in shapes.items()}

    def ranks_for(r: int) -> dict[str, int]:
        return {n: min(int(r * weights[n]), full[n]) for n in shapes}

    def cost(r: int) -> int:
        return sum(matrix_cost(rank, *shapes[n]) for n, rank in ranks_for(r).items())

    best, hi = 0, max(full.values())
    while best < hi:  # cost is non-decreasing in r: bisect for the largest feasible r
        mid = (best + hi + 1) // 2
        best, hi = (mid, hi) if cost(mid) <= budget_params else (best, mid - 1)
    return ranks_for(best)


def ffn_channel_scores(ffn_in: list[nn.Linear], ffn_out: list[nn.Linear], in_rms: list[torch.Tensor],
                       out_rms: list[torch.Tensor]) -> torch.Tensor:
    """Activation-weighted magnitude of each intermediate channel: ``sum |W_ij| * rms(x_j)`` over every weight
    that reads from or writes to the channel (gradient-free, Wanda-style)."""
    score = sum((linear_weight(l).abs().float() * rms[None, :]).sum(dim=1) for l, rms in zip(ffn_in, in_rms))
    return score + sum(linear_weight(l).abs().float().sum(dim=0) * rms for l, rms in zip(ffn_out, out_rms))


def channels_to_keep(scores: torch.Tensor, keep: int, protected_fraction: float) -> torch.Tensor:
    """Sorted indices of the ``keep`` kept channels: the lowest-scoring ``protected_fraction`` always, then the
    highest-scoring of the rest."""
    n = scores.numel()
    protected = min(round(protected_fraction * n), keep)
    order = scores.argsort(stable=True)  # ascending
    kept = torch.cat([order[:protected], order[protected:].flip(0)[: keep - protected]])
    return kept.sort().values


@torch.no_grad()
def compress_lorap(model: nn.Module, config: LoRAPConfig,
                   calibration_batches: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    """LoRAP in place, block by block; returns the export layout (FFN layers become smaller ``nn.Linear``)."""
    model = unwrap_model(model)
    roles_by_kind = config.module_roles(model)
    targets = find_target_linears(model, [s for kind in ROLES for s in roles_by_kind[kind]])

    def role(name: str) -> str:
        # In order: BERT's `output.dense` suffix also matches the attention output, which is a V/O matrix.
        for kind in ROLES:
            if any(name == s or name.endswith("." + s) for s in roles_by_kind[kind]):
                return kind
        raise AssertionError(name)

    def compress_block(block, names, mean_squares):
        roles = {n: module_role(n, roles_by_kind) for n in names}
        attention = [n for n in names if roles[n] in ("qk_modules", "vo_modules")]
        if attention:
            shapes = {n: linear_shape(targets[n]) for n in attention}
            weights = {n: config.vo_rank_ratio if roles[n] == "vo_modules" else 1.0 for n in attention}
            budget = config.target_budget * sum(m * k for m, k in shapes.values())
            for n, rank in attention_ranks(shapes, weights, budget).items():
                _replace_by_factors(model, n, rank, mean_squares[n].sqrt())
        ffn_in = [n for n in names if roles[n] == "ffn_in_modules"]
        ffn_out = [n for n in names if roles[n] == "ffn_out_modules"]
        if ffn_in or ffn_out:
            widths = {linear_shape(targets[n])[0] for n in ffn_in} | {linear_shape(targets[n])[1] for n in ffn_out}
            if len(widths) != 1 or not ffn_in or not ffn_out:
                raise ValueError(f"FFN of {block!r} must have input layers ({ffn_in}) and output layers ({ffn_out}) "
                                 f"that agree on one intermediate width, got widths {sorted(widths)}.")
            width = widths.pop()
            rms = {n: mean_squares[n].sqrt() for n in ffn_in + ffn_out}
            scores = ffn_channel_scores([targets[n] for n in ffn_in], [targets[n] for n in ffn_out],
                                        [rms[n] for n in ffn_in], [rms[n] for n in ffn_out])
            keep = channels_to_keep(scores, math.floor(config.target_budget * width), config.protected_fraction)
            for n in ffn_in:
                set_submodule(model, n, sliced_linear(targets[n], keep, dim=0))
            for n in ffn_out:
                set_submodule(model, n, sliced_linear(targets[n], keep, dim=1))

    blockwise(model, targets, calibration_batches, compress_block, desc="LoRAP")
    modules = {n: describe_module(model.get_submodule(n)) for n in targets}
    return record_compression(model, modules, "lorap", config.to_dict())
