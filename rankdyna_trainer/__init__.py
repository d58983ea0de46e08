"""Low-rank compression of Transformer models inside one Hugging Face Trainer run.

Importing the package registers the ``"rankdyna"`` quantization method with transformers, so
``AutoModelFor....from_pretrained`` loads compressed models (see :mod:`rankdyna_trainer.quantizer`).
"""

from .budget import ParameterBudget, allocate_groups, matrix_cost
from .export import LowRankLinear
from .methods.rankdyna import (
    RankDynaCallback,
    RankDynaConfig,
    SingularGroupScores,
    SVDLinear,
    export_model,
    prepare_model,
    rank_pattern,
)
from .quantizer import (
    LowRankCompressionConfig,
    load_compressed_model,
    read_compression_config,
    record_compression,
    save_compressed_model,
)
from .targets import default_target_names, find_target_linears

# Imported for their side effect too: the MPO package registers its exported module type for loading.
from .methods import lorap, mpo  # noqa: E402,F401  (isort: skip)

__version__ = "0.1.0"

__all__ = [
    "LowRankCompressionConfig", "LowRankLinear", "ParameterBudget", "RankDynaCallback", "RankDynaConfig",
    "SVDLinear", "SingularGroupScores", "allocate_groups", "default_target_names", "export_model",
    "find_target_linears", "load_compressed_model", "matrix_cost", "prepare_model", "rank_pattern",
    "read_compression_config", "record_compression", "save_compressed_model",
]
