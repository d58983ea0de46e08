"""peft's AdaLoRA as a peer of the compression methods: the same target matrices, trained from the Trainer.

AdaLoRA adapts a frozen dense model with adaptively-ranked updates; it does not compress. Its exported
model is the dense model with the updates merged in, so its parameter count is the dense one; what it is
compared on is the allocation pattern and the cost of training.
"""

from __future__ import annotations

from peft import AdaLoraConfig, TaskType, get_peft_model
from torch import nn

from ...targets import default_target_names, find_target_linears, is_conv1d

_TASK_TYPES = (("ForSequenceClassification", TaskType.SEQ_CLS), ("ForCausalLM", TaskType.CAUSAL_LM),
               ("LMHeadModel", TaskType.CAUSAL_LM), ("ForConditionalGeneration", TaskType.SEQ_2_SEQ_LM),
               ("ForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM), ("ForTokenClassification", TaskType.TOKEN_CLS),
               ("ForQuestionAnswering", TaskType.QUESTION_ANS))


def peft_task_type(model: nn.Module) -> TaskType:
    """peft's task type for a transformers head class (it decides which head peft keeps trainable); sequence
    classification when the class name says nothing."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), TaskType.SEQ_CLS)


def adalora_config(model: nn.Module, total_steps: int, target_rank: int = 8, init_rank: int = 12,
                   warmup_fraction: float = 0.1, final_fraction: float = 0.2, interval: int = 10,
                   target_modules=None, **overrides) -> AdaLoraConfig:
    """AdaLoRA settings on the same schedule fractions and target matrices as RankDyna's defaults."""
    if total_steps is None or total_steps < 1:
        raise ValueError(f"AdaLoRA needs the number of optimizer steps up front (total_step), got {total_steps!r}.")
    targets = target_modules or default_target_names(model)
    # peft needs to be told that transformers' Conv1D (GPT-2) stores its weight transposed.
    overrides.setdefault("fan_in_fan_out", any(is_conv1d(m) for m in find_target_linears(model, targets).values()))
    return AdaLoraConfig(
        task_type=peft_task_type(model),
        target_modules=targets,
        target_r=target_rank, init_r=init_rank,
        tinit=round(warmup_fraction * total_steps), tfinal=round(final_fraction * total_steps),
        deltaT=interval, total_step=total_steps, **overrides,
    )


def prepare_adalora(model: nn.Module, config: AdaLoraConfig):
    return get_peft_model(model, config)


def adalora_rank_pattern(peft_model) -> dict[str, int]:
    """Kept rank per adapted matrix (the full initial rank before the first allocation)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    if config.rank_pattern:
        return {name: int(sum(mask)) for name, mask in config.rank_pattern.items()}
    return {}


def export_adalora(peft_model) -> tuple[nn.Module, dict[str, dict]]:
    """Merge the adapters into the base weights: a plain dense model with no compressed modules."""
    return peft_model.merge_and_unload(), {}
