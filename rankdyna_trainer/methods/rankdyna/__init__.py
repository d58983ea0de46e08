from .callback import RANK_PATTERN_FILE, RankDynaCallback
from .config import RankDynaConfig
from .importance import SingularGroupScores
from .layer import ChannelGatedLinear, SVDLinear
from .model import export_model, gated_layers, kept_params, prepare_model, rank_pattern, svd_layers
from .sharding import gather_unsharded_model, is_sharded, shard_model

__all__ = [
    "RANK_PATTERN_FILE", "ChannelGatedLinear", "RankDynaCallback", "RankDynaConfig", "SingularGroupScores",
    "SVDLinear", "export_model", "gated_layers", "gather_unsharded_model", "is_sharded", "kept_params", "prepare_model",
    "rank_pattern", "shard_model", "svd_layers",
]
