"""Which linear layers a compression method factorizes."""

from __future__ import annotations

import re

from torch import nn

# Module-name suffixes per architecture family. BERT's `output.dense` also matches the attention output,
# which is intended: every projection in the encoder block is a target.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
for _alias in ("mistral", "qwen2", "qwen3", "smollm3"):
    DEFAULT_TARGET_MODULES[_alias] = DEFAULT_TARGET_MODULES["llama"]

# Layers that belong to the task head or embeddings never match a suffix default on their own,
# but a user regex could reach them; classification heads are tiny and task-specific, so skip them.
_NEVER_TARGETED = re.compile(r"(^|\.)(classifier|lm_head|pooler|score|qa_outputs)(\.|$)")


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default target modules for model_type={model_type!r}; pass `target_modules` (a list of "
            f"module-name suffixes or a regex). Defaults exist for: {sorted(DEFAULT_TARGET_MODULES)}."
        )
    return DEFAULT_TARGET_MODULES[model_type]


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_linears(
    model: nn.Module, target_modules: list[str] | str | None = None, linear_types: tuple[type, ...] = (nn.Linear,)
) -> dict[str, nn.Module]:
    """Map module name -> layer for every ``linear_types`` layer that ``target_modules`` selects.

    ``target_modules`` follows peft: a list means name suffixes, a string is a regex matched against the
    whole module name, ``None`` picks the defaults for the model's architecture.
    """
    targets = default_target_modules(model) if target_modules is None else target_modules
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and _matches(name, targets) and not _NEVER_TARGETED.search(name)
    }
    if not found:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, linear_types)][:8]
        raise ValueError(
            f"target_modules={targets!r} matched no {'/'.join(t.__name__ for t in linear_types)} layer. "
            f"Linear layers of this model look like: {linear_names}."
        )
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
