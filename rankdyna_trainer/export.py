"""Physically smaller models: export, save and reload.

Every compression method ends here: targeted layers become ``Linear(n, r) -> Linear(r, m)`` (or stay dense
where that is smaller). ``compression_config.json`` beside the weights records each replaced module, so
:func:`load_compressed_model` can rebuild the architecture before loading the state dict.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Callable

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from .budget import keeps_dense, matrix_cost
from .targets import set_submodule

COMPRESSION_CONFIG_FILE = "compression_config.json"
FORMAT_VERSION = 1


class LowRankLinear(nn.Module):
    """``Linear(in, rank, bias=False)`` followed by ``Linear(rank, out)``."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        with warnings.catch_warnings():
            # A rank-0 layer (output = bias) is legitimate; its empty weights need no initialisation.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """``W = left @ right`` with ``left`` (out x r) and ``right`` (r x in)."""
        layer = cls(right.shape[1], right.shape[0], left.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.down.weight.copy_(right)
            layer.up.weight.copy_(left)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


def factorized_or_dense(left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The smaller of the two storage forms of ``left @ right`` (+ ``bias``)."""
    out_features, rank, in_features = left.shape[0], left.shape[1], right.shape[1]
    if not keeps_dense(rank, out_features, in_features):
        return LowRankLinear.from_factors(left, right, bias)
    dense = nn.Linear(in_features, out_features, bias=bias is not None, device=left.device, dtype=left.dtype)
    with torch.no_grad():
        dense.weight.copy_(left @ right)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def describe_module(module: nn.Module) -> dict:
    """The JSON entry that lets :data:`MODULE_BUILDERS` rebuild ``module`` with the right shapes."""
    if isinstance(module, LowRankLinear):
        return {"type": "low_rank", "in_features": module.in_features, "rank": module.rank,
                "out_features": module.out_features, "bias": module.up.bias is not None}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    describe = getattr(module, "describe_for_export", None)
    if describe is None:
        raise TypeError(f"Cannot describe exported module of type {type(module).__name__}.")
    return describe()


MODULE_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "low_rank": lambda e: LowRankLinear(e["in_features"], e["rank"], e["out_features"], e["bias"]),
    "linear": lambda e: nn.Linear(e["in_features"], e["out_features"], bias=e["bias"]),
}


def exported_params(entry: dict) -> int:
    """Weight parameters (biases excluded) of one exported module, counted as the budget counts them."""
    if entry["type"] == "low_rank":
        return matrix_cost(entry["rank"], entry["out_features"], entry["in_features"])
    if entry["type"] == "linear":
        return entry["out_features"] * entry["in_features"]
    return entry["params"]


def save_compressed_model(model: nn.Module, save_directory: str, modules: dict[str, dict], method: str,
                          method_config: dict | None = None, **save_kwargs) -> None:
    """``model.save_pretrained`` plus the layout of the compressed modules."""
    model.save_pretrained(save_directory, **save_kwargs)
    layout = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "method_config": method_config or {},
        "modules": modules,
        "compressed_params": sum(exported_params(e) for e in modules.values()),
    }
    with open(os.path.join(save_directory, COMPRESSION_CONFIG_FILE), "w") as f:
        json.dump(layout, f, indent=2)


def read_compression_config(directory: str) -> dict:
    path = os.path.join(directory, COMPRESSION_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {directory!r} is not a model saved by save_compressed_model.")
    with open(path) as f:
        try:
            layout = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the file is truncated or corrupt; export the "
                             "model again.") from err
    if not (isinstance(layout, dict) and layout.get("format_version") == FORMAT_VERSION
            and isinstance(layout.get("modules"), dict)):
        raise ValueError(f"{path} is not a valid compression config (format_version {FORMAT_VERSION} with a "
                         f"'modules' mapping expected).")
    return layout


def load_compressed_model(directory: str, model_class: type | None = None, torch_dtype: torch.dtype | None = None):
    """Rebuild and load a model written by :func:`save_compressed_model`, ready for inference.

    ``model_class`` defaults to the class recorded in the saved ``config.json`` (``architectures``).
    """
    layout = read_compression_config(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    if model_class is None:
        architectures = config.architectures or []
        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"config.json in {directory!r} names no known architecture ({architectures}); "
                             "pass model_class.")
        model_class = getattr(transformers, architectures[0])
    model = model_class(config)
    for name, entry in layout["modules"].items():
        if entry.get("type") not in MODULE_BUILDERS:
            raise ValueError(f"Module {name!r} has unknown type {entry.get('type')!r} in {COMPRESSION_CONFIG_FILE}; "
                             f"known types: {sorted(MODULE_BUILDERS)}.")
        try:
            model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"Module {name!r} from {COMPRESSION_CONFIG_FILE} does not exist in "
                             f"{model_class.__name__}: the saved layout does not fit this architecture.") from err
        set_submodule(model, name, _build_module(name, entry))
    state_dict = _read_state_dict(directory)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches: a layout or config.json that disagrees with the weights
        raise ValueError(f"Saved weights in {directory!r} do not fit the rebuilt model: {err}") from err
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"Saved weights in {directory!r} do not fit the rebuilt model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()


def _build_module(name: str, entry: dict) -> nn.Module:
    for key in ("in_features", "out_features", "rank"):
        value = entry.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Module {name!r} in {COMPRESSION_CONFIG_FILE} has {key}={value!r}; expected an "
                             "integer >= 0. The file is corrupt; export the model again.")
    try:
        return MODULE_BUILDERS[entry["type"]](entry)
    except KeyError as err:
        raise ValueError(f"Module {name!r} in {COMPRESSION_CONFIG_FILE} is missing {err.args[0]!r} "
                         f"(entry: {entry}). The file is corrupt; export the model again.") from err


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if not isinstance(tied, dict) else tied.keys())


def _read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return state
    raise FileNotFoundError(f"No model.safetensors (or index) in {directory!r}.")
