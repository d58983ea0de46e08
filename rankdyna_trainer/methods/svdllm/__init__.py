from .config import SVDLLMConfig
from .model import compress_svdllm, relative_energy_scores

__all__ = ["SVDLLMConfig", "compress_svdllm", "relative_energy_scores"]
