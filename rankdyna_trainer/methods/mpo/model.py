"""Turning targeted linear layers into MPO form under the shared parameter budget, and exporting them."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ...export import MODULE_BUILDERS
from ...quantizer import record_compression
from ...targets import find_target_linears, linear_shape, set_submodule, unwrap_model
from .config import MPOConfig
from .layer import MPOLinear, balanced_factors, mpo_bonds, mpo_params


def bond_for_budget(out_features: int, in_features: int, num_tensors: int, budget_params: float) -> int:
    """Largest bond cap whose MPO fits ``budget_params`` (at least 1, since a chain needs a bond)."""
    out_factors = balanced_factors(out_features, num_tensors)
    in_factors = balanced_factors(in_features, num_tensors)
    lo, hi = 1, max(mpo_bonds(out_factors, in_factors))
    while lo < hi:  # parameters grow with the cap: bisect for the largest cap that fits
        mid = (lo + hi + 1) // 2
        fits = mpo_params(out_factors, in_factors, mpo_bonds(out_factors, in_factors, mid)) <= budget_params
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo


def prepare_mpo(model: nn.Module, config: MPOConfig) -> nn.Module:
    """Replace every targeted ``nn.Linear``/``Conv1D`` (in place) by a truncated :class:`MPOLinear` within the budget.

    Each matrix gets ``target_budget`` of its own dense size. Unless ``config.train_central``, central tensors
    are frozen so fine-tuning updates only the auxiliary tensors. The layout is recorded on ``model.config``
    right away (the MPO form is also the exported form), so Trainer checkpoints reload with ``from_pretrained``.
    """
    targets = find_target_linears(model, config.target_modules)
    with torch.no_grad():
        for name, linear in tqdm(targets.items(), desc="MPO decomposition", disable=len(targets) < 50):
            out_features, in_features = linear_shape(linear)
            budget = config.target_budget * out_features * in_features
            bond = bond_for_budget(out_features, in_features, config.num_tensors, budget)
            layer = MPOLinear.from_linear(linear, config.num_tensors, max_bond=bond)
            layer.tensors[layer.center].requires_grad_(config.train_central)
            set_submodule(model, name, layer)
    export_mpo(model, config)
    return model


def mpo_layers(model: nn.Module) -> dict[str, MPOLinear]:
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, MPOLinear)}


def export_mpo(model: nn.Module, config: MPOConfig | None = None) -> dict[str, dict]:
    """Layout of the MPO layers, also recorded on ``model.config`` (``model.save_pretrained`` writes it)."""
    layers = mpo_layers(model)
    if not layers:
        raise ValueError("The model holds no MPOLinear layer: call prepare_mpo(model, config) first.")
    modules = {name: layer.describe_for_export() for name, layer in layers.items()}
    existing = getattr(getattr(unwrap_model(model), "config", None), "quantization_config", None)
    settings = config.to_dict() if config is not None else getattr(existing, "method_config", None)
    return record_compression(model, modules, "mpo", settings)


MODULE_BUILDERS["mpo"] = lambda entry: MPOLinear.from_shapes(entry["shapes"], entry["bias"])
