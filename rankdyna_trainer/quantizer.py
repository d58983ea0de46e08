"""Hugging Face-native save and load of compressed models, through transformers' quantizer hooks.

A compressed model differs from its architecture only in the shapes of some modules. transformers already has a
mechanism for packages that change module shapes at load time: a ``quantization_config`` entry in ``config.json``
names a method, and the :class:`~transformers.quantizers.HfQuantizer` registered for it (with
``register_quantization_config`` / ``register_quantizer``) rewrites the freshly built model before the weights are
loaded. This module registers the method ``"rankdyna"``:

* :class:`LowRankCompressionConfig` is the ``config.json`` entry: the compression method, its settings, and one
  layout entry per replaced module (see :func:`rankdyna_trainer.export.describe_module`). Every method attaches
  it to ``model.config`` when it compresses (:func:`record_compression`), so ``model.save_pretrained`` writes it.
* :class:`LowRankQuantizer` swaps those modules into the model that ``from_pretrained`` builds on the meta device,
  before any weight is read. transformers then loads the checkpoint through its own path: key renames, tied
  weights, shards, ``dtype=``, ``device_map=`` work as for any model, and nothing is initialised at random first.

Importing ``rankdyna_trainer`` registers both. Where it is not imported, transformers warns that it does not know
the method ``rankdyna`` and loads the plain architecture; every compressed module keeps a parameter under the dense
layer's name ``weight`` with a different shape, so that load then stops with transformers' size-mismatch error
instead of returning randomly initialised layers.
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .export import FORMAT_VERSION, build_module, exported_params
from .targets import set_submodule, unwrap_model

QUANT_METHOD = "rankdyna"


class LowRankCompressionConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed model: which modules were replaced, by what, and how.

    Args:
        modules: module name -> layout entry (``type`` plus shapes), as :func:`~rankdyna_trainer.export.describe_module`
            writes it.
        method: the compression method that produced the model (``rankdyna``, ``svd``, ``lorap``, ...).
        method_config: that method's settings, for the record.
        compressed_params: weight parameters of the replaced modules (computed from ``modules`` when omitted).
    """

    def __init__(self, modules: dict | None = None, method: str | None = None, method_config: dict | None = None,
                 compressed_params: int | None = None, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.method = method
        self.method_config = method_config or {}
        self.modules = modules if modules is not None else {}
        self.post_init()
        self.compressed_params = (sum(exported_params(e) for e in self.modules.values())
                                  if compressed_params is None else compressed_params)

    def post_init(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"The compression layout in config.json has format_version={self.format_version!r}; this "
                             f"rankdyna_trainer reads format_version {FORMAT_VERSION}. Export the model again with "
                             "this version.")
        if not isinstance(self.modules, dict):
            raise ValueError(f"quantization_config.modules must map module names to layout entries, got "
                             f"{type(self.modules).__name__}.")
        for name, entry in self.modules.items():
            # Building on the meta device checks every entry without allocating anything.
            with torch.device("meta"):
                build_module(name, entry)

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method, "format_version": self.format_version, "method": self.method,
                "method_config": self.method_config, "compressed_params": self.compressed_params,
                "modules": self.modules}


class LowRankQuantizer(HfQuantizer):
    """Rebuilds the compressed modules listed in :class:`LowRankCompressionConfig` before weights load.

    The model reaches :meth:`_process_model_before_weight_loading` freshly built on the meta device, so the swap
    allocates nothing; the loaded modules are ordinary full-precision modules, trainable and compilable.
    """

    def __init__(self, quantization_config: LowRankCompressionConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError("A rankdyna compression layout only describes a model saved in compressed form; this "
                             "checkpoint has none in its config.json. Compress the dense model with a method "
                             "(rankdyna_trainer.prepare_model, or rankdyna_trainer.methods.get_method), then "
                             "save_pretrained it.")

    def _process_model_before_weight_loading(self, model, **kwargs):
        for name, entry in self.quantization_config.modules.items():
            set_submodule(model, _module_name_in(model, name), build_module(name, entry))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def postprocess_model(self, model, **kwargs):
        # Keep the layout on the config (a later save_pretrained writes it again) without marking the model as
        # quantized: its weights are ordinary tensors, and Trainer refuses to fine-tune "quantized" base models.
        model.config.quantization_config = self.quantization_config
        model.is_quantized = False
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _module_name_in(model: nn.Module, name: str) -> str:
    """``name`` as it exists in ``model``: a layout saved from a model with a task head (``bert.encoder...``)
    also loads into the bare base model (``encoder...``) and the other way round, as transformers' own key
    loading allows."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    candidates = [name]
    if prefix != "." and name.startswith(prefix):
        candidates.append(name.removeprefix(prefix))
    elif prefix != ".":
        candidates.append(prefix + name)
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise ValueError(f"Module {name!r} of the compression layout in config.json does not exist in "
                     f"{type(model).__name__}: the saved layout does not fit this architecture.")


def _register() -> None:
    # Re-registering (a reloaded module) replaces the entries instead of failing on "already registered".
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(LowRankCompressionConfig)
    register_quantizer(QUANT_METHOD)(LowRankQuantizer)


_register()


# ------------------------------------------------------------------------------------------------------------------
# Attaching the layout, and thin conveniences around save_pretrained / from_pretrained
# ------------------------------------------------------------------------------------------------------------------
def record_compression(model: nn.Module, modules: dict[str, dict], method: str,
                       method_config: dict | None = None) -> dict[str, dict]:
    """Attach the layout of ``modules`` to ``model.config`` so ``model.save_pretrained`` writes it; returns
    ``modules``. A model without a transformers config (a bare ``nn.Module``) is left as it is."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return modules
    existing = getattr(config, "quantization_config", None)
    existing_method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method",
                                                                                             None)
    if existing is not None and existing_method != QUANT_METHOD:
        raise ValueError(f"The model is quantized with {existing_method!r}; rankdyna_trainer compresses full-precision "
                         "models only.")
    settings = json.loads(json.dumps(method_config or {}, default=str))  # JSON-safe, as config.json needs
    config.quantization_config = LowRankCompressionConfig(modules=modules, method=method, method_config=settings)
    return modules


def save_compressed_model(model: nn.Module, save_directory: str, modules: dict[str, dict] | None = None,
                          method: str | None = None, method_config: dict | None = None, **save_kwargs) -> None:
    """``model.save_pretrained(save_directory)``, after recording ``modules`` (when given) on the config.

    Every method records its layout itself when it compresses, so plain ``model.save_pretrained`` is enough;
    this remains for callers that pass the layout explicitly.
    """
    if modules:
        record_compression(model, modules, method or "unknown", method_config)
    unwrap_model(model).save_pretrained(save_directory, **save_kwargs)


def read_compression_config(directory: str) -> dict:
    """The compression layout saved in ``directory/config.json`` (validated), as a dict."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not a saved model.")
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the file is truncated or corrupt.") from err
    entry = saved.get("quantization_config")
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} holds no rankdyna compression layout (quantization_config with quant_method "
                         f"{QUANT_METHOD!r}): {directory!r} is not a compressed model.")
    return LowRankCompressionConfig.from_dict(entry).to_dict()


def is_compressed_model_dir(directory: str) -> bool:
    try:
        read_compression_config(directory)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_compressed_model(directory: str, model_class: type | None = None, dtype: torch.dtype | None = None,
                          **from_pretrained_kwargs):
    """``model_class.from_pretrained(directory, dtype=dtype, ...)``, in eval mode.

    ``model_class`` defaults to the class recorded in the saved ``config.json`` (``architectures``). Any
    ``AutoModelFor...`` class works just as well once ``rankdyna_trainer`` is imported.
    """
    if model_class is None:
        config = transformers.AutoConfig.from_pretrained(directory)
        architectures = config.architectures or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"config.json in {directory!r} names no known architecture ({architectures}); "
                             "pass model_class.")
        model_class = getattr(transformers, architectures[0])
    if dtype is not None:
        from_pretrained_kwargs["dtype"] = dtype
    return model_class.from_pretrained(directory, **from_pretrained_kwargs).eval()
