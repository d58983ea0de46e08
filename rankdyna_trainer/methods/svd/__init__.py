from .config import SVDConfig
from .model import compress_svd

__all__ = ["SVDConfig", "compress_svd"]
