"""Post-training compression that needs no fine-tuning: LoRAP and the (activation-weighted) SVD baselines."""

from ...calibration import input_mean_squares
from .config import LoRAPConfig, LowRankSVDConfig
from .model import (
    attention_ranks,
    channels_to_keep,
    compress_lorap,
    compress_svd,
    ffn_channel_scores,
    svd_factors,
    uniform_rank,
)

__all__ = [
    "LoRAPConfig", "LowRankSVDConfig", "attention_ranks", "channels_to_keep", "compress_lorap", "compress_svd",
    "ffn_channel_scores", "input_mean_squares", "svd_factors", "uniform_rank",
]
