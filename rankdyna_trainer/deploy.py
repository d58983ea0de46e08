"""Running an exported model outside training: ONNX export and ONNX Runtime, dynamic int8, and a model card.

A model exported by :func:`rankdyna_trainer.export_model` is made of ``nn.Linear`` layers (one
:class:`~rankdyna_trainer.export.LowRankLinear` is a ``Linear(n, r)`` and a matmul by an ``m x r`` weight), so the
ecosystem's tools take it as they take the dense model:

* :func:`export_onnx`: ``torch.onnx.export`` (the dynamo exporter) with a dynamic batch and sequence length; the
  graph holds the factor pair as two MatMuls. :func:`onnx_session` runs it in ONNX Runtime.
* :func:`quantize_onnx_int8` (ONNX Runtime's dynamic quantizer) and :func:`quantize_torch_int8` (torch's
  ``quantize_dynamic``): int8 weights, activations quantized on the fly, on top of the low rank.
* :func:`write_model_card`: ``README.md`` in the exported folder, started from the Trainer's model card
  (``transformers.modelcard.TrainingSummary``) when a Trainer is given, with what the compression did.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import GatheredLinear, LowRankLinear, ScatteredLinear, scatter_kept
from .quantizer import read_compression_config

RANK_PATTERN_FILE = "rank_pattern.json"  # written by RankDynaCallback into the Trainer's output folder
HEATMAP_FILE = "rank_heatmap.png"  # written by scripts/run_glue.py beside the model
MODEL_CARD_FILE = "README.md"
COMPRESSION_HEADING = "## Compression"


# -- ONNX ------------------------------------------------------------------------------------------------------
class _OutputOf(nn.Module):
    """``model(**inputs).<output>`` as a plain tensor, without the KV cache (an ONNX graph has fixed outputs)."""

    def __init__(self, model: nn.Module, output: str, names: list[str]):
        super().__init__()
        self.model, self.output, self.names = model, output, names
        self.no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.names, tensors)), **self.no_cache), self.output)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: dict[str, torch.Tensor],
                output: str = "logits", opset_version: int = 18) -> Path:
    """Write ``model`` (dense or exported) to one ``.onnx`` file taking the tensors of ``example_inputs`` (batch x
    sequence, both dynamic) and returning ``output`` (``"logits"`` for a classifier or a causal LM; a decoder is
    exported without its KV cache, as one full forward)."""
    if not example_inputs:
        raise ValueError("export_onnx needs example inputs, e.g. the tokenizer's output for two sentences.")
    for name, tensor in example_inputs.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or min(tensor.shape) < 2:
            raise ValueError(f"example input {name!r} must be a batch x sequence tensor with both sizes >= 2 (so "
                             f"that the exporter keeps them dynamic), got {getattr(tensor, 'shape', type(tensor))}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = _OutputOf(model, output, names).eval()
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(example_inputs.values()), str(path), input_names=names,
                          output_names=[output], dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),
                          opset_version=opset_version, dynamo=True, external_data=False)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path``; ``threads`` sets its intra-op threads (default: ONNX Runtime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict) -> np.ndarray:
    """The session's first output for ``inputs`` (torch tensors or numpy arrays), restricted to the graph's inputs
    (a tokenizer may return more, e.g. ``token_type_ids`` for a model exported without them)."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise ValueError(f"The ONNX model takes {names}; missing from the inputs: {missing}.")
    feed = {n: inputs[n].numpy() if isinstance(inputs[n], torch.Tensor) else inputs[n] for n in names}
    return session.run(None, feed)[0]


def quantize_onnx_int8(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """ONNX Runtime's dynamic quantization: int8 MatMul weights (per-tensor, signed), activations quantized on the
    fly. Works on the dense and the exported graph alike: each factor of a low-rank layer is its own MatMul."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(source), str(destination), weight_type=QuantType.QInt8)
    return destination


# -- torch int8 ----------------------------------------------------------------------------------------------
def _as_linear_pair(layer: LowRankLinear) -> nn.Sequential:
    """``LowRankLinear`` as ``Linear(n, r)`` then ``Linear(r, m)``, the form ``quantize_dynamic`` swaps for int8
    (it only replaces ``nn.Linear`` modules, and the output factor is a bare parameter)."""
    up = nn.Linear(layer.rank, layer.out_features, bias=layer.bias is not None,
                   device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        up.weight.copy_(layer.weight)
        if layer.bias is not None:
            up.bias.copy_(layer.bias)
    return nn.Sequential(layer.down, up)


class _KeptDimsAroundLinear(nn.Module):
    """A ``ScatteredLinear`` / ``GatheredLinear`` as an inner ``nn.Linear`` of its kept dims (which
    ``quantize_dynamic`` swaps for int8) with the same scatter after it or gather before it."""

    def __init__(self, layer: ScatteredLinear | GatheredLinear):
        super().__init__()
        self.scatter = isinstance(layer, ScatteredLinear)
        self.width, self.index = layer.width, layer._index(layer.weight.device)
        out_features, in_features = layer.weight.shape
        self.linear = nn.Linear(in_features, out_features, bias=layer.bias is not None,
                                device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.linear.bias.copy_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scatter:
            return self.linear(x.index_select(-1, self.index))
        return scatter_kept(self.linear(x), self.index, self.width)


def quantize_torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (both factors of each low-rank layer and the kept dims of each
    attention-channel layer included) replaced by torch's dynamically quantized int8 ``Linear`` (CPU inference only;
    the copy cannot be saved with ``save_pretrained``). Rank-0 layers (output = bias) stay as they are."""
    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear) and module.rank > 0:
            replacement = _as_linear_pair(module)
        elif isinstance(module, (ScatteredLinear, GatheredLinear)) and module.index:
            replacement = _KeptDimsAroundLinear(module)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def torch_module_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s ``state_dict`` as ``torch.save`` writes it (what an int8 torch model takes on disk)."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


# -- model card ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def compression_facts(folder: str | os.PathLike) -> dict:
    """What a model card states about the compression of the exported ``folder``: method, target budget,
    targeted parameters kept (of dense), whole-model parameters, from the folder's ``config.json`` and (when the
    Trainer wrote it there) ``rank_pattern.json``."""
    folder = Path(folder)
    compression = read_compression_config(str(folder))
    method_config = compression.get("method_config") or {}
    pattern = _read_json(folder / RANK_PATTERN_FILE) or {}
    facts = {"method": compression.get("method"), "target_budget": method_config.get("target_budget"),
             "kept_params": compression.get("compressed_params"), "dense_params": pattern.get("dense_params"),
             "modules": len(compression.get("modules", {}))}
    if facts["kept_params"] is not None and facts["dense_params"]:
        facts["kept_fraction"] = facts["kept_params"] / facts["dense_params"]
    return facts


def write_model_card(folder: str | os.PathLike, trainer=None, *, metric_name: str | None = None,
                     metric: float | None = None, dense_metric: float | None = None, floor: float | None = None,
                     dataset: str | None = None, base_model: str | None = None) -> Path:
    """Write ``README.md`` into the exported ``folder`` (what ``push_to_hub`` publishes): method, budget,
    parameters kept, the dev metric beside the dense model's and the constant-prediction floor (each when known),
    the rank heat map when ``rank_heatmap.png`` is in the folder, and how to load the model. With ``trainer``, the
    card starts from the Trainer's own (``TrainingSummary.from_trainer``: metadata, hyperparameters, training
    results); without it, a card this function wrote before keeps everything above its compression section (so
    a later call can add the dense model's metric). Metrics are fractions (0.857, not 85.7). Returns the card's
    path."""
    folder = Path(folder)
    facts = compression_facts(folder)
    for name, value in (("metric", metric), ("dense_metric", dense_metric), ("floor", floor)):
        if value is not None and not -1.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a fraction in [-1, 1] (e.g. 0.857 for 85.7 %; Matthews correlation may "
                             f"be negative), got {value!r}.")
    path = folder / MODEL_CARD_FILE
    if trainer is not None:
        head = _trainer_card(trainer, dataset, base_model)
    elif path.is_file() and COMPRESSION_HEADING in path.read_text(encoding="utf-8"):
        head = path.read_text(encoding="utf-8").split(COMPRESSION_HEADING)[0]  # keep the Trainer's part of the card
    else:
        head = _plain_header(base_model, folder.resolve().name)
    card = head.rstrip() + "\n\n" + _compression_section(folder, facts, metric_name, metric, dense_metric, floor)
    path.write_text(card, encoding="utf-8")
    return path


def _trainer_card(trainer, dataset: str | None, base_model: str | None) -> str:
    from transformers.modelcard import TrainingSummary

    summary = TrainingSummary.from_trainer(trainer, tags=["rankdyna", "low-rank", "compressed"],
                                           dataset=dataset, finetuned_from=base_model)
    return summary.to_model_card()


def _plain_header(base_model: str | None, title: str) -> str:
    meta = ["---", "library_name: transformers", "tags:", "- rankdyna", "- low-rank", "- compressed"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    return "\n".join(meta + ["---", "", f"# {title}", ""])


def _compression_section(folder: Path, facts: dict, metric_name, metric, dense_metric, floor) -> str:
    method = facts["method"] or "unknown"
    rows = [("method", "RankDyna (Hua et al., Findings of EMNLP 2023): low-rank factorization whose ranks are "
                       "allocated across all layers during fine-tuning" if method == "rankdyna" else method)]
    if facts["target_budget"] is not None:
        rows.append(("target budget", f"{facts['target_budget']:g} of the targeted weights"))
    if facts["kept_params"] is not None:
        of = (f" of {facts['dense_params']:,} ({_pct(facts['kept_fraction'])} %)" if facts.get("kept_fraction")
              else "")
        rows.append(("targeted parameters kept", f"{facts['kept_params']:,}{of}, in {facts['modules']} layers"))
    if metric is not None:
        label = metric_name or "dev metric"
        rows.append((label, f"{_pct(metric)} (dense model: {_pct(dense_metric)}; constant-prediction floor: "
                            f"{_pct(floor)})"))
    lines = [COMPRESSION_HEADING, "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if (folder / HEATMAP_FILE).is_file():
        lines += ["", "Kept rank per layer and matrix type:", "", f"![kept rank per matrix]({HEATMAP_FILE})"]
    lines += ["", "## Loading", "", "The layers are `Linear(n, r)` then `Linear(r, m)` where that is smaller, so "
              "`import rankdyna_trainer` first: it registers the loader that rebuilds those shapes.", "",
              "```python", "import rankdyna_trainer  # registers the \"rankdyna\" loader",
              "from transformers import AutoModel, pipeline", "",
              "model = AutoModel.from_pretrained(\"<this folder or repo>\")", "```", ""]
    return "\n".join(lines)
