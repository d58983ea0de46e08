"""Which linear layers a compression method factorizes.

By default: every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's transposed linear layer) inside the
model's repeated blocks. transformers names a model's block classes in ``_no_split_modules`` (the unit that
``device_map`` never splits: ``BertLayer``, ``LlamaDecoderLayer``, ``T5Block``, ...); models that name none
(DistilBERT, ALBERT, DeBERTa-v2) keep their blocks in an ``nn.ModuleList``, which is used instead. Embeddings,
heads and poolers sit outside the blocks; MoE routers sit inside and are skipped by name.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# The layer types every method can compress. Conv1D computes ``x @ W + b`` with ``W`` stored ``in x out``.
TARGET_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)

# Layers that belong to the task head or embeddings never match the default, but a user regex or suffix
# could reach them; classification heads are tiny and task-specific, so skip them.
_NEVER_TARGETED = re.compile(r"(^|\.)(classifier|lm_head|pooler|score|qa_outputs)(\.|$)")
# MoE routers (Mixtral/Qwen-MoE `gate`, Switch `router`) live inside the blocks; factorizing them would change
# which experts tokens reach.
_ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)(\.|$)")


# The part each matrix plays in a block (LoRAP's roles; RankDyna's FFN channel groups use the FFN ones). Which
# matrix is which is a naming question the block structure does not answer, so it is a table per architecture.
# GPT-2's fused c_attn (query, key and value in one matrix) takes the Q/K role.
ROLES = ("qk_modules", "vo_modules", "ffn_in_modules", "ffn_out_modules")
_LLAMA_ROLES = {"qk_modules": ["q_proj", "k_proj"], "vo_modules": ["v_proj", "o_proj"],
                "ffn_in_modules": ["gate_proj", "up_proj"], "ffn_out_modules": ["down_proj"]}
_BERT_ROLES = {"qk_modules": ["attention.self.query", "attention.self.key"],
               "vo_modules": ["attention.self.value", "attention.output.dense"],
               "ffn_in_modules": ["intermediate.dense"], "ffn_out_modules": ["output.dense"]}
MODULE_ROLES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm3"), _LLAMA_ROLES),
    **dict.fromkeys(("bert", "roberta"), _BERT_ROLES),
    "gpt2": {"qk_modules": ["attn.c_attn"], "vo_modules": ["attn.c_proj"], "ffn_in_modules": ["mlp.c_fc"],
             "ffn_out_modules": ["mlp.c_proj"]},
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` and data-parallel wrappers, whose module names carry no prefix."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``out x in`` weight of an ``nn.Linear`` or a ``Conv1D`` (a transposed view for the latter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or a ``Conv1D``."""
    return (module.nf, module.nx) if is_conv1d(module) else (module.out_features, module.in_features)


def repeated_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost repeated blocks: instances of the classes in ``_no_split_modules`` (embedding classes
    excluded), or else the elements of the model's ``nn.ModuleList``s."""
    model = unwrap_model(model)
    block_classes = {c for c in (getattr(model, "_no_split_modules", None) or ()) if "Embedding" not in c}
    named = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in block_classes]
    if not named:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        named = [(f"{n}.{i}", child) for n in lists for i, child in enumerate(model.get_submodule(n))]
    blocks: dict[str, nn.Module] = {}
    for name, module in sorted(named, key=lambda item: item[0].count(".")):
        if not any(name.startswith(outer + ".") for outer in blocks):
            blocks[name] = module
    return blocks


def default_target_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear``/``Conv1D`` layers inside the repeated blocks, routers and heads excluded."""
    model = unwrap_model(model)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"No repeated blocks found in {type(model).__name__} (no `_no_split_modules` class and no nn.ModuleList), "
            "so there are no default target modules; pass `target_modules` (a list of module-name suffixes or a regex)."
        )
    names = [f"{block}.{name}" for block, module in blocks.items()
             for name, layer in module.named_modules() if isinstance(layer, TARGET_TYPES)]
    return [n for n in names if not _ROUTER.search(n) and not _NEVER_TARGETED.search(n)]


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_linears(
    model: nn.Module, target_modules: list[str] | str | None = None, linear_types: tuple[type, ...] = TARGET_TYPES
) -> dict[str, nn.Module]:
    """Map module name -> layer for every ``linear_types`` layer that ``target_modules`` selects.

    ``target_modules`` follows peft: a list means name suffixes, a string is a regex matched against the
    whole module name, ``None`` picks every linear layer of the repeated blocks (:func:`default_target_names`).
    Names are those of the unwrapped model (no ``_orig_mod.`` prefix from ``torch.compile``).
    """
    model = unwrap_model(model)
    if target_modules is None:
        defaults = set(default_target_names(model))
        found = {n: m for n, m in model.named_modules() if n in defaults and isinstance(m, linear_types)}
        if found:
            return found
        targets = "the repeated blocks' layers"
    else:
        targets = target_modules
        found = {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, linear_types) and _matches(name, target_modules) and not _NEVER_TARGETED.search(name)
        }
        if found:
            return found
    type_names = "/".join(t.__name__ for t in linear_types)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, linear_types)][:8]
    raise ValueError(
        f"target_modules={targets!r} matched no {type_names} layer. {type_names} layers of this model look like: "
        f"{linear_names}."
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    model = unwrap_model(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def has_table_roles(model: nn.Module) -> bool:
    """Whether :data:`MODULE_ROLES` has an entry for the model's ``model_type``."""
    return getattr(getattr(unwrap_model(model), "config", None), "model_type", None) in MODULE_ROLES


def table_roles(model: nn.Module, method: str, fields: str) -> dict[str, list[str]]:
    """The :data:`MODULE_ROLES` entry for the model's ``model_type`` (a copy), or a ValueError telling the user of
    ``method`` to pass ``fields`` (the config fields that give the roles by hand)."""
    model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
    if model_type not in MODULE_ROLES:
        raise ValueError(f"{method} has no module roles for model_type={model_type!r}; pass {fields} (name "
                         f"suffixes). Tables exist for: {sorted(MODULE_ROLES)}.")
    return {kind: list(suffixes) for kind, suffixes in MODULE_ROLES[model_type].items()}


def module_role(name: str, roles: dict[str, list[str]]) -> str | None:
    """The first role in :data:`ROLES` order whose suffixes match ``name`` (BERT's ``output.dense`` suffix also
    matches the attention output, which the V/O role claims first), or None."""
    for kind in ROLES:
        if any(name == s or name.endswith("." + s) for s in roles.get(kind, ())):
            return kind
    return None


def ffn_channel_layers(model: nn.Module, roles: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each FFN output layer (the one reading the intermediate channels) -> the FFN input layers of the same
    repeated block (the ones writing them), checked to agree on one intermediate width."""
    model = unwrap_model(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TARGET_TYPES)}
    found: dict[str, list[str]] = {}
    for block in repeated_blocks(model):
        names = [n for n in layers if n.startswith(block + ".")]
        outputs = [n for n in names if module_role(n, roles) == "ffn_out_modules"]
        inputs = [n for n in names if module_role(n, roles) == "ffn_in_modules"]
        if not outputs and not inputs:
            continue
        widths = {linear_shape(layers[n])[0] for n in inputs} | {linear_shape(layers[n])[1] for n in outputs}
        if len(outputs) != 1 or not inputs or len(widths) != 1:
            raise ValueError(f"Block {block!r} needs one FFN output layer ({roles.get('ffn_out_modules')}) and FFN "
                             f"input layers ({roles.get('ffn_in_modules')}) that agree on one intermediate width; "
                             f"found outputs {outputs}, inputs {inputs}, widths {sorted(widths)}.")
        found[outputs[0]] = inputs
    if not found:
        raise ValueError(f"No FFN layers matched the roles ffn_in_modules={roles.get('ffn_in_modules')} and "
                         f"ffn_out_modules={roles.get('ffn_out_modules')} in {type(model).__name__}.")
    return found
