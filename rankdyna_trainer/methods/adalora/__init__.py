from .callback import AdaLoraCallback
from .model import adalora_config, adalora_rank_pattern, export_adalora, prepare_adalora

__all__ = ["AdaLoraCallback", "adalora_config", "adalora_rank_pattern", "export_adalora", "prepare_adalora"]
