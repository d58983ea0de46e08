from .config import TFWSVDConfig
from .model import compress_tfwsvd, svd_risk, weighted_error, weighted_low_rank

__all__ = ["TFWSVDConfig", "compress_tfwsvd", "svd_risk", "weighted_error", "weighted_low_rank"]
