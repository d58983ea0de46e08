"""Every method by name, behind one interface, so a benchmark or script can treat them alike.

Two kinds of method:

* **in-training** (``dense``, ``rankdyna``, ``adalora``): ``prepare`` the pre-trained model, train it with the
  returned callbacks, then ``export`` it: one fine-tuning run.
* **post-hoc** (``svd``, ``fwsvd``, ``tfwsvd``, ``ars``, ``svdllm``): ``compress`` a model already fine-tuned on
  the task, given a dataloader of task batches (labelled; ``svdllm`` only reads their inputs, as calibration
  data), then fine-tune the factorized model again: two runs.

Either way the result is a model plus the module layout that
:func:`~rankdyna_trainer.export.save_compressed_model` takes.

Example::

    method = get_method("fwsvd")
    config = method.make_config(target_budget=0.5)
    modules = method.compress(finetuned_model, config, train_dataloader)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .adalora import AdaLoraCallback, adalora_config, export_adalora, prepare_adalora
from .ars import ARSConfig, compress_ars
from .fwsvd import FWSVDConfig, compress_fwsvd
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
    # post-hoc: (fine-tuned model, config, dataloader) -> modules layout; replaces layers in place
    compress: Callable[[nn.Module, Any, Any], dict] | None = None
    # in-training: (pre-trained model, config) -> (model to train, Trainer callbacks)
    prepare: Callable[[nn.Module, Any], tuple[nn.Module, list]] | None = None
    # in-training: (trained model) -> (exported model, modules layout)
    export: Callable[[nn.Module], tuple[nn.Module, dict]] | None = None

    @property
    def fine_tuning_rounds(self) -> int:
        return 2 if self.post_hoc else 1


def _dense_config(target_budget: float = 1.0, **_) -> dict:
    return {"target_budget": 1.0}


def _adalora_config_factory(target_budget: float | None = None, *, model=None, total_steps=None, **overrides):
    # AdaLoRA does not compress: the budget has no meaning for it and is ignored.
    return adalora_config(model, total_steps, **overrides)


def _prepare_rankdyna(model, config):
    return prepare_model(model, config), [RankDynaCallback(config)]


METHODS: dict[str, CompressionMethod] = {
    m.name: m
    for m in (
        CompressionMethod("dense", "plain fine-tuning, no compression", False, _dense_config,
                          prepare=lambda model, config: (model, []), export=lambda model: (model, {})),
        CompressionMethod("rankdyna", "RankDyna: ranks pruned by importance during fine-tuning", False,
                          RankDynaConfig, prepare=_prepare_rankdyna,
                          export=lambda model: (model, export_model(model))),
        CompressionMethod("adalora", "peft AdaLoRA (adapter, not compression; exported merged, dense)", False,
                          _adalora_config_factory,
                          prepare=lambda model, config: (prepare_adalora(model, config), [AdaLoraCallback()]),
                          export=export_adalora),
        CompressionMethod("svd", "truncated SVD, uniform rank", True, SVDConfig, compress=compress_svd),
        CompressionMethod("fwsvd", "Fisher-weighted SVD (row-wise Fisher, closed form), uniform rank", True,
                          FWSVDConfig, compress=compress_fwsvd),
        CompressionMethod("tfwsvd", "element-wise Fisher-weighted low rank (ALS from FWSVD), uniform rank", True,
                          TFWSVDConfig, compress=compress_tfwsvd),
        CompressionMethod("ars", "FWSVD + adaptive rank selection (learned masks, projected to budget)", True,
                          ARSConfig, compress=compress_ars),
        CompressionMethod("svdllm", "whitened SVD (SVD-LLM): truncation error = output error on calibration inputs",
                          True, SVDLLMConfig, compress=compress_svdllm),
    )
}


def get_method(name: str) -> CompressionMethod:
    if name not in METHODS:
        raise ValueError(f"Unknown compression method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]
