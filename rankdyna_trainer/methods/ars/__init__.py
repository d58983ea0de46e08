from .config import ARSConfig
from .layer import MaskedFactorizedLinear, RankMaskHypernetwork, alignment_penalty, budget_penalty
from .model import compress_ars, learn_rank_masks

__all__ = ["ARSConfig", "MaskedFactorizedLinear", "RankMaskHypernetwork", "alignment_penalty", "budget_penalty",
           "compress_ars", "learn_rank_masks"]
