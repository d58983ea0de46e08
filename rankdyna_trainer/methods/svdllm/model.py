"""SVD-LLM-style whitened SVD: truncate ``SVD(W S)`` where ``S`` whitens the layer's calibration inputs.

Calibration is block by block (:mod:`rankdyna_trainer.calibration`): each block is whitened on the inputs it
receives from the already compressed blocks before it. With ``allocation="global"`` a first pass over the
dense model measures every matrix's whitened spectrum, the ranks are allocated over all matrices at once,
and a second, block-by-block pass factorizes and truncates at those ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from ...budget import allocate_groups
from ...calibration import blockwise, first_batches
from ...export import describe_module, factorized_or_dense
from ...factorize import budget_params, target_linears, whitened_factorization
from ...quantizer import record_compression
from ...targets import is_conv1d, linear_shape, linear_weight, set_submodule, unwrap_model
from ..lorap.model import uniform_rank
from .config import SVDLLMConfig


def relative_energy_scores(s: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Score of each group: the fraction of its matrix's output energy it carries, per parameter it costs.

    ``s`` are whitened singular values, so ``s_i^2 / sum(s^2)`` is the relative output error of dropping
    group ``i``; dividing by the group's cost ``m + n`` makes the greedy allocation a value-per-cost knapsack.
    Scores fall with ``s``, so every matrix keeps a prefix of its groups.
    """
    energy = s.double().pow(2)
    return (energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny) / (out_features + in_features)).float()


def _whitened_spectra(model: nn.Module, layers: dict[str, nn.Linear], batches, damping: float) -> dict:
    spectra = {}

    def measure(block, names, second_moments):
        cache = {}
        for n in names:
            spectra[n] = whitened_factorization(linear_weight(layers[n]), second_moments[n], damping, cache).s

    blockwise(model, layers, batches, measure, desc="SVD-LLM spectra", statistic="second_moment")
    return spectra


@torch.no_grad()
def compress_svdllm(model: nn.Module, config: SVDLLMConfig, calibration) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place) by their whitened truncated SVD; return the layout.

    ``calibration``: a list or dataloader of token batches (``input_ids``, optional ``attention_mask``).
    """
    model = unwrap_model(model)
    batches = first_batches(calibration, config.max_calibration_batches, "svdllm")
    layers = target_linears(model, config.target_modules)
    shapes = [linear_shape(l) for l in layers.values()]
    if config.allocation == "global":
        spectra = _whitened_spectra(model, layers, batches, config.damping)
        scores = [relative_energy_scores(spectra[n], *shape) for n, shape in zip(layers, shapes)]
        keep = allocate_groups(scores, shapes, budget_params(shapes, config.target_budget))
        ranks = dict(zip(layers, torch.stack([k.sum() for k in keep]).tolist()))
    else:  # SVD-LLM's setting: every matrix keeps the same fraction of its own weights
        ranks = {n: uniform_rank(config.target_budget, *shape) for n, shape in zip(layers, shapes)}

    def compress_block(block, names, second_moments):
        cache = {}
        for n in names:
            linear = layers[n]
            factorization = whitened_factorization(linear_weight(linear), second_moments[n], config.damping, cache)
            left, right = factorization.factors(torch.arange(factorization.s.numel()) < ranks[n])
            bias = linear.bias.detach() if linear.bias is not None else None
            dtype = linear.weight.dtype
            exported = factorized_or_dense(left.to(dtype).contiguous(), right.to(dtype).contiguous(), bias,
                                           conv1d=is_conv1d(linear))
            set_submodule(model, n, exported.to(linear.weight.device))

    blockwise(model, layers, batches, compress_block, desc="SVD-LLM", statistic="second_moment")
    modules = {n: describe_module(model.get_submodule(n)) for n in layers}
    return record_compression(model, modules, "svdllm", config.to_dict())
