"""Low-rank compression of Transformer models inside one Hugging Face Trainer run."""

from .budget import ParameterBudget, allocate_groups, matrix_cost
from .export import LowRankLinear, load_compressed_model, read_compression_config, save_compressed_model
from .methods.rankdyna import (
    RankDynaCallback,
    RankDynaConfig,
    SingularGroupScores,
    SVDLinear,
    export_model,
    prepare_model,
    rank_pattern,
)
from .targets import DEFAULT_TARGET_MODULES, find_target_linears

# Imported for their side effect too: the MPO package registers its exported module type for loading.
from .methods import lorap, mpo  # noqa: E402,F401  (isort: skip)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES", "LowRankLinear", "ParameterBudget", "RankDynaCallback", "RankDynaConfig",
    "SVDLinear", "SingularGroupScores", "allocate_groups", "export_model", "find_target_linears",
    "load_compressed_model", "matrix_cost", "prepare_model", "rank_pattern", "read_compression_config",
    "save_compressed_model",
]
