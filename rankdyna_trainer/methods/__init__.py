"""Every method by name, behind one interface, so a benchmark or script can treat them alike.

Two kinds of method:

* **in-training** (``dense``, ``rankdyna``, ``mpo``, ``adalora``): ``prepare`` the pre-trained model, train it with
  the returned callbacks, then ``export`` it: one fine-tuning run.
* **post-hoc** (``svd``, ``fwsvd``, ``tfwsvd``, ``ars``, ``lorap``, ``svdllm``): ``compress`` a model (for all but
  ``lorap``, one already fine-tuned on the task), given a dataloader of task batches (``lorap`` and ``svdllm`` only
  read their inputs, as calibration data), then fine-tune the factorized model again: two runs.

Either way the compressed model records its module layout on ``model.config``, so ``model.save_pretrained``
writes a folder that ``AutoModelFor....from_pretrained`` reloads (see :mod:`rankdyna_trainer.quantizer`).

Every ``make_config`` takes the same keywords: ``target_budget``, plus ``model`` and ``total_steps`` for methods
that need them (AdaLoRA), plus the method's own config fields.

Example::

    method = get_method("fwsvd")
    config = method.make_config(target_budget=0.5)
    modules = method.compress(finetuned_model, config, train_dataloader)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..calibration import first_batches
from ..targets import unwrap_model
from .adalora import AdaLoraCallback, adalora_config, export_adalora, prepare_adalora
from .ars import ARSConfig, compress_ars
from .fwsvd import FWSVDConfig, compress_fwsvd
from .lorap import LoRAPConfig, compress_lorap
from .mpo import MPOConfig, export_mpo, prepare_mpo
from .rankdyna import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from .svd import SVDConfig, compress_svd
from .svdllm import SVDLLMConfig, compress_svdllm
from .tfwsvd import TFWSVDConfig, compress_tfwsvd


@dataclass(frozen=True)
class CompressionMethod:
    name: str
    summary: str
    post_hoc: bool
    make_config: Callable[..., Any]
    # post-hoc: (model, config, dataloader) -> modules layout; replaces layers in place
    compress: Callable[[nn.Module, Any, Any], dict] | None = None
    # in-training: (pre-trained model, config) -> (model to train, Trainer callbacks)
    prepare: Callable[[nn.Module, Any], tuple[nn.Module, list]] | None = None
    # in-training: (trained model) -> (exported model, modules layout)
    export: Callable[[nn.Module], tuple[nn.Module, dict]] | None = None
    # the method's config dataclass (None: dense, adalora), for callers that check which options it takes
    config_class: type | None = None

    @property
    def fine_tuning_rounds(self) -> int:
        return 2 if self.post_hoc else 1


def _config_of(config_class: type) -> Callable[..., Any]:
    """``config_class(target_budget=..., **fields)``, ignoring the ``model``/``total_steps`` context."""
    def make_config(target_budget: float | None = None, *, model=None, total_steps=None, **fields):
        if target_budget is not None:
            fields["target_budget"] = target_budget
        return config_class(**fields)

    return make_config


def _dense_config(target_budget: float = 1.0, **_) -> dict:
    return {"target_budget": 1.0}


def _adalora_config_factory(target_budget: float | None = None, *, model=None, total_steps=None, **overrides):
    # AdaLoRA does not compress: the budget has no meaning for it and is ignored.
    return adalora_config(model, total_steps, **overrides)


def _prepare_rankdyna(model, config):
    return prepare_model(model, config), [RankDynaCallback(config)]


def _calibration_batches(model, dataloader, limit: int, method: str) -> list[dict]:
    """The first ``limit`` batches of ``dataloader`` on the model's device."""
    return first_batches(dataloader, limit, method, device=next(unwrap_model(model).parameters()).device)


def _compress_lorap(model, config: LoRAPConfig, dataloader) -> dict:
    return compress_lorap(model, config, _calibration_batches(model, dataloader, config.max_calibration_batches,
                                                              "LoRAP"))


def _compress_svdllm(model, config: SVDLLMConfig, dataloader) -> dict:
    return compress_svdllm(model, config, _calibration_batches(model, dataloader, config.max_calibration_batches,
                                                               "svdllm"))


def _export_mpo(model):
    return model, export_mpo(model)


METHODS: dict[str, CompressionMethod] = {
    m.name: m
    for m in (
        CompressionMethod("dense", "plain fine-tuning, no compression", False, _dense_config,
                          prepare=lambda model, config: (model, []), export=lambda model: (model, {})),
        CompressionMethod("rankdyna", "RankDyna: ranks pruned by importance during fine-tuning", False,
                          _config_of(RankDynaConfig), prepare=_prepare_rankdyna,
                          export=lambda model: (model, export_model(model)), config_class=RankDynaConfig),
        CompressionMethod("mpo", "matrix product operators; fine-tuning trains the auxiliary tensors", False,
                          _config_of(MPOConfig), prepare=lambda model, config: (prepare_mpo(model, config), []),
                          export=_export_mpo, config_class=MPOConfig),
        CompressionMethod("adalora", "peft AdaLoRA (adapter, not compression; exported merged, dense)", False,
                          _adalora_config_factory,
                          prepare=lambda model, config: (prepare_adalora(model, config), [AdaLoraCallback()]),
                          export=export_adalora),
        CompressionMethod("svd", "truncated SVD, uniform rank", True, _config_of(SVDConfig), compress=compress_svd,
                          config_class=SVDConfig),
        CompressionMethod("fwsvd", "Fisher-weighted SVD (row-wise Fisher, closed form), uniform rank", True,
                          _config_of(FWSVDConfig), compress=compress_fwsvd, config_class=FWSVDConfig),
        CompressionMethod("tfwsvd", "element-wise Fisher-weighted low rank (ALS from FWSVD), uniform rank", True,
                          _config_of(TFWSVDConfig), compress=compress_tfwsvd, config_class=TFWSVDConfig),
        CompressionMethod("ars", "FWSVD + adaptive rank selection (learned masks, projected to budget)", True,
                          _config_of(ARSConfig), compress=compress_ars, config_class=ARSConfig),
        CompressionMethod("lorap", "LoRAP: activation-weighted SVD for attention, channel pruning for the FFN", True,
                          _config_of(LoRAPConfig), compress=_compress_lorap, config_class=LoRAPConfig),
        CompressionMethod("svdllm", "whitened SVD (SVD-LLM): truncation error = output error on calibration inputs",
                          True, _config_of(SVDLLMConfig), compress=_compress_svdllm, config_class=SVDLLMConfig),
    )
}


def get_method(name: str) -> CompressionMethod:
    if name not in METHODS:
        raise ValueError(f"Unknown compression method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]
