"""Matrix product operator (MPO) compression: local tensors around a central tensor, auxiliary-only fine-tuning."""

from .config import MPOConfig
from .layer import MPOLinear, balanced_factors, mpo_bonds, mpo_contract, mpo_decompose, mpo_params
from .model import bond_for_budget, export_mpo, mpo_layers, prepare_mpo

__all__ = [
    "MPOConfig", "MPOLinear", "balanced_factors", "bond_for_budget", "export_mpo", "mpo_bonds", "mpo_contract",
    "mpo_decompose", "mpo_layers", "mpo_params", "prepare_mpo",
]
