"""Physically smaller models: the module types that compressed layers are exported as, and their layout.

Every compression method ends here: each targeted layer becomes a :class:`LowRankLinear` (``Linear(n, r)`` then an
``m x r`` output factor) or stays dense (an ``nn.Linear``, or a ``Conv1D`` where the model had one) where that is
no larger. :func:`describe_module` writes one JSON entry per replaced module and :data:`MODULE_BUILDERS` rebuilds
a module of the right shape from it; :mod:`rankdyna_trainer.quantizer` stores the entries in ``config.json`` so
that ``from_pretrained`` rebuilds the compressed architecture before transformers loads the weights.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .budget import keeps_dense, matrix_cost
from .targets import is_conv1d, linear_weight

FORMAT_VERSION = 2


class LowRankLinear(nn.Module):
    """``y = down(x) @ weight.T + bias``: ``down`` is ``Linear(in, rank, bias=False)``, ``weight`` is ``out x rank``.

    The output factor carries the dense layer's parameter name ``weight`` on purpose. Its shape differs from the
    dense ``out x in`` weight (``rank < min(in, out)`` whenever factorizing is smaller), so in a process where
    rankdyna_trainer is not imported, transformers' loader stops with a size mismatch on ``<layer>.weight``
    instead of initialising the layer at random. Code that reads ``layer.weight.dtype`` (T5's feed-forward) also
    gets a tensor of the layer's dtype.
    """

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        factory = {"device": device, "dtype": dtype}
        with warnings.catch_warnings():
            # A rank-0 layer (output = bias) is legitimate; its empty weights need no initialisation.
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.down = nn.Linear(in_features, rank, bias=False, **factory)
        # Zeros, not random: every constructed layer is filled from factors or from a checkpoint.
        self.weight = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @classmethod
    def from_factors(cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """``W = left @ right`` with ``left`` (out x r) and ``right`` (r x in)."""
        layer = cls(right.shape[1], right.shape[0], left.shape[0], bias=bias is not None,
                    device=left.device, dtype=left.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(right)
            layer.weight.copy_(left)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


def dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool = False) -> nn.Module:
    """An ``nn.Linear`` holding the ``out x in`` ``weight``, or a transformers ``Conv1D`` (which stores it
    transposed) when the layer it replaces was one, so the exported model keeps the original architecture."""
    out_features, in_features = weight.shape
    if conv1d:
        layer = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.T)
            layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))
        return layer
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def sliced_linear(linear: nn.Module, index: torch.Tensor, dim: int) -> nn.Module:
    """The layer with only the ``index`` rows (``dim=0``, outputs) or columns (``dim=1``, inputs) of its
    ``out x in`` weight; same module type (``nn.Linear`` or ``Conv1D``): structured pruning of FFN channels."""
    weight = linear_weight(linear).detach().index_select(dim, index)
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and dim == 0:
        bias = bias.index_select(0, index)
    return dense_layer(weight, bias, conv1d=is_conv1d(linear))


def factorized_or_dense(left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None,
                        conv1d: bool = False) -> nn.Module:
    """The smaller of the two storage forms of ``left @ right`` (+ ``bias``); ``conv1d``: the dense form is a
    ``Conv1D``, as the replaced layer was."""
    out_features, rank, in_features = left.shape[0], left.shape[1], right.shape[1]
    if not keeps_dense(rank, out_features, in_features):
        return LowRankLinear.from_factors(left, right, bias)
    return dense_layer(left @ right, bias, conv1d)


class _KeptDims(nn.Module):
    """The kept dims ``index`` of a ``width``-wide activation, as a fixed index (recorded in the layout, not in the
    weights), with its tensor made once per device."""

    def _set_index(self, index, width: int) -> None:
        self.index, self.width = [int(i) for i in index], int(width)
        self._index_tensors: dict[torch.device, torch.Tensor] = {}

    def _index(self, device: torch.device) -> torch.Tensor:
        tensor = self._index_tensors.get(device)
        if tensor is None:
            tensor = torch.tensor(self.index, dtype=torch.long, device=device)
            # While torch.export / torch.compile trace, the tensor is a constant of the graph; caching it then would
            # be a module attribute assigned during tracing (torch.export warns and drops it).
            if not torch.compiler.is_compiling():
                self._index_tensors[device] = tensor
        return tensor


def scatter_kept(y: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """``y`` (last dim: the kept outputs ``index``) placed into a zero tensor ``width`` wide along its last dim (the
    gradient of ``y`` is the output gradient's kept slice). Shared by export, training and int8 deployment so that the
    three put the kept dims in the same places."""
    return y.new_zeros(*y.shape[:-1], width).index_copy(-1, index, y)


class ScatteredLinear(_KeptDims):
    """``Linear(in, k)`` whose ``k`` outputs land at the ``index`` positions of a ``width``-wide output, zeros
    elsewhere: an attention projection (query, key, value) that keeps some dims of each head, so that the unchanged
    attention code still sees ``heads x head_dim`` (a head with no kept query/key dims gets uniform attention, one
    with no kept value dims contributes nothing). ``weight`` is ``k x in``: in a process without rankdyna_trainer the
    dense ``width x in`` weight does not fit it, so transformers' loader stops instead of initialising it at random.
    """

    def __init__(self, in_features: int, index, width: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._set_index(index, width)
        self.in_features, self.out_features = in_features, self.width
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(len(self.index), in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(len(self.index), **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return scatter_kept(y, self._index(y.device), self.width)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={len(self.index)}, out_features={self.width}"

    def describe_for_export(self) -> dict:
        return {"type": "scattered_linear", "in_features": self.in_features, "out_features": self.width,
                "index": list(self.index), "bias": self.bias is not None,
                "params": len(self.index) * self.in_features}


class GatheredLinear(_KeptDims):
    """``Linear(k, out)`` reading only the ``index`` dims of its ``width``-wide input: an attention's output layer
    after some value dims were removed (the value scatters its kept dims into place, :class:`ScatteredLinear`).
    ``weight`` is ``out x k``, which the dense ``out x width`` weight does not fit (see :class:`ScatteredLinear`)."""

    def __init__(self, index, width: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._set_index(index, width)
        self.in_features, self.out_features = self.width, out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_features, len(self.index), **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self._index(x.device)), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.width}, kept={len(self.index)}, out_features={self.out_features}"

    def describe_for_export(self) -> dict:
        return {"type": "gathered_linear", "in_features": self.width, "out_features": self.out_features,
                "index": list(self.index), "bias": self.bias is not None,
                "params": self.out_features * len(self.index)}


def scattered_linear(linear: nn.Module, index: torch.Tensor) -> nn.Module:
    """``linear`` (an ``nn.Linear``, or a layer with its ``weight`` and ``bias``) keeping only its ``index`` outputs,
    scattered back into its full width (:class:`ScatteredLinear`); the plain ``nn.Linear`` when every output is kept."""
    weight, bias = linear.weight.detach(), linear.bias.detach() if linear.bias is not None else None
    if index.numel() == weight.shape[0]:
        return dense_layer(weight, bias)
    layer = ScatteredLinear(weight.shape[1], index.tolist(), weight.shape[0], bias is not None, weight.device,
                            weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.index_select(0, index))
        if bias is not None:
            layer.bias.copy_(bias.index_select(0, index))
    return layer


def gathered_linear(weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor) -> nn.Module:
    """The ``out x in`` layer reading only its ``index`` inputs (:class:`GatheredLinear`); the plain ``nn.Linear``
    when every input is kept."""
    bias = bias.detach() if bias is not None else None
    if index.numel() == weight.shape[1]:
        return dense_layer(weight.detach(), bias)
    layer = GatheredLinear(index.tolist(), weight.shape[1], weight.shape[0], bias is not None, weight.device,
                           weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.detach().index_select(1, index))
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _kept_index(entry: dict, width: int) -> list[int]:
    """A layout entry's ``index``, checked: increasing dims within ``width``."""
    index = entry["index"]
    if not isinstance(index, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in index) \
            or any(b <= a for a, b in zip(index, index[1:])) or (index and not 0 <= index[0] <= index[-1] < width):
        raise ValueError(f"index must be increasing integers in [0, {width}), got {index!r}")
    return index


def describe_module(module: nn.Module) -> dict:
    """The JSON entry that lets :data:`MODULE_BUILDERS` rebuild ``module`` with the right shapes."""
    if isinstance(module, LowRankLinear):
        return {"type": "low_rank", "in_features": module.in_features, "rank": module.rank,
                "out_features": module.out_features, "bias": module.bias is not None}
    if isinstance(module, Conv1D):
        return {"type": "conv1d", "in_features": module.nx, "out_features": module.nf, "bias": True}
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
    "conv1d": lambda e: Conv1D(e["out_features"], e["in_features"]),
    "scattered_linear": lambda e: ScatteredLinear(e["in_features"], _kept_index(e, e["out_features"]),
                                                  e["out_features"], e["bias"]),
    "gathered_linear": lambda e: GatheredLinear(_kept_index(e, e["in_features"]), e["in_features"],
                                                e["out_features"], e["bias"]),
}


def exported_params(entry: dict) -> int:
    """Weight parameters (biases excluded) of one exported module, counted as the budget counts them."""
    if entry["type"] == "low_rank":
        return matrix_cost(entry["rank"], entry["out_features"], entry["in_features"])
    if entry["type"] in ("linear", "conv1d"):
        return entry["out_features"] * entry["in_features"]
    return entry["params"]


def build_module(name: str, entry: dict) -> nn.Module:
    """The module an exported layout entry describes (on the current default device and dtype)."""
    if not isinstance(entry, dict) or entry.get("type") not in MODULE_BUILDERS:
        kind = entry.get("type") if isinstance(entry, dict) else entry
        raise ValueError(f"Module {name!r} has unknown type {kind!r} in the compression layout; known types: "
                         f"{sorted(MODULE_BUILDERS)}.")
    for key in ("in_features", "out_features", "rank"):
        value = entry.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Module {name!r} in the compression layout has {key}={value!r}; expected an integer "
                             ">= 0. The layout is corrupt; export the model again.")
    try:
        return MODULE_BUILDERS[entry["type"]](entry)
    except KeyError as err:
        raise ValueError(f"Module {name!r} in the compression layout is missing {err.args[0]!r} (entry: {entry}). "
                         "The layout is corrupt; export the model again.") from err
    except ValueError as err:
        raise ValueError(f"Module {name!r} in the compression layout: {err}. The layout is corrupt; export the model "
                         "again.") from err
