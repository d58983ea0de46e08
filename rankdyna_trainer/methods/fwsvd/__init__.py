from .config import FWSVDConfig
from .model import compress_fwsvd, fisher_weighted_factorization, row_weighted_error, row_weights

__all__ = ["FWSVDConfig", "compress_fwsvd", "fisher_weighted_factorization", "row_weighted_error", "row_weights"]
