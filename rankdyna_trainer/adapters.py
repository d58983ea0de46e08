"""peft LoRA adapters on an exported (compressed) model: compress once, adapt to many tasks.

peft wraps ``nn.Linear`` layers only; an exported low-rank layer is a :class:`~rankdyna_trainer.export.LowRankLinear`,
which peft refuses ("Target module LowRankLinear ... is not supported"). :func:`with_low_rank_support` registers
:class:`LowRankLoraLinear` for it through peft's custom-module mapping, so ``target_modules=["query", "value"]``
works as on the dense model: the adapter adds ``B A x`` beside the layer's own ``up(down(x))``. peft does not
save that mapping with the adapter, so reload with :func:`load_lora_adapter`::

    config = with_low_rank_support(LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(compressed_folder), config)
    ...  # train with the Trainer, then model.save_pretrained(adapter_folder)
    model = load_lora_adapter(AutoModelForSequenceClassification.from_pretrained(compressed_folder), adapter_folder)
"""

from __future__ import annotations

import warnings

from .export import GatheredLinear, LowRankLinear, ScatteredLinear

# Exported layers peft does not know: low-rank pairs, and the attention projections that keep some dims of each head
# (attention channels). Each has in_features / out_features, and its output is what LoRA adds B A x to.
COMPRESSED_LAYERS = (LowRankLinear, ScatteredLinear, GatheredLinear)


def _lora_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


class _LowRankLoraMixin:
    """peft's LoRA ``Linear`` around an exported layer (``COMPRESSED_LAYERS``): same forward (base output plus the
    scaled ``B A x``); peft reads ``in_features`` / ``out_features`` from the layer. Merging is refused: the base's
    weight is an ``m x r`` factor or the kept rows or columns only, not the ``m x n`` matrix peft would add ``B A``
    to."""

    def __init__(self, base_layer, adapter_name: str, **kwargs):
        with warnings.catch_warnings():
            # peft warns "Unsupported layer type" for any non-torch layer; this one is supported here.
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "A LoRA adapter cannot be merged into a compressed low-rank layer (LowRankLinear stores an m x r output "
            "factor, ScatteredLinear / GatheredLinear the kept rows / columns only, not the m x n weight the "
            "adapter's B @ A adds to): keep the adapter unmerged (peft's default), or merge_and_unload the adapter "
            "into the dense model before compressing."
        )


_LAYER_CLASS = None


def low_rank_lora_layer() -> type:
    """The peft LoRA layer class for ``LowRankLinear`` (built on first use, so peft is imported only when needed)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = type("LowRankLoraLinear", (_LowRankLoraMixin, _lora_linear()), {"__module__": __name__})
    return _LAYER_CLASS


def with_low_rank_support(config):
    """``config`` (a peft ``LoraConfig``) with LoRA layers for the exported layers peft does not know
    (``COMPRESSED_LAYERS``: ``LowRankLinear``, and ``ScatteredLinear`` / ``GatheredLinear`` of attention channels)
    registered. Returns the same object."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"with_low_rank_support takes a peft LoraConfig, got {type(config).__name__}.")
    config._register_custom_module(dict.fromkeys(COMPRESSED_LAYERS, low_rank_lora_layer()))
    return config


def load_lora_adapter(model, adapter_folder: str, **kwargs):
    """``PeftModel.from_pretrained(model, adapter_folder)`` for an adapter trained on a compressed model (the
    saved adapter config does not carry the mapping of the compressed layers, so it is registered again here)."""
    from peft import LoraConfig, PeftModel

    config = with_low_rank_support(LoraConfig.from_pretrained(adapter_folder))
    return PeftModel.from_pretrained(model, adapter_folder, config=config, **kwargs)
