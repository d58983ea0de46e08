"""Input statistics of targeted linear layers, collected block by block through the (partly compressed) model.

Post-training methods calibrate on a few batches of sample text. Block ``i`` is calibrated on the inputs it
will really see: the outputs of blocks ``0..i-1`` *after* they were compressed. Rather than running the model
from the embeddings for every block (quadratic in depth), the inputs of each block are kept and each block is
run on its own: once to collect the statistics, once more after it is compressed to feed the next block.
This assumes the blocks are applied one after another (block ``i``'s output is block ``i+1``'s input), which
holds for the encoder and decoder stacks of BERT- and LLaMA-style models.

Two statistics, per targeted linear, over calibration tokens (padding excluded):

* ``"mean_square"``: ``E[x_j^2]`` per input channel (activation-weighted SVD, LoRAP);
* ``"second_moment"``: ``E[x x^T]`` in float64 (whitened SVD, SVD-LLM).
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

STATISTICS = ("mean_square", "second_moment")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def group_by_block(names: Iterable[str]) -> dict[str, list[str]]:
    """``{block name: [module names]}`` in model order, a block being the first ``<...>.<index>`` prefix."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in names:
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"Module {name!r} is not inside a numbered block (like `model.layers.3.`); "
                             "block-by-block calibration needs repeated blocks.")
        blocks[match.group(1)].append(name)
    return dict(blocks)


class _StopForward(Exception):
    pass


class _InputStatistics:
    """Forward pre-hooks that add up one statistic of each named layer's input over calibration tokens.

    Layers that read the same input tensor (q/k/v, gate/up) share one computation, and their means are one
    tensor object, so consumers can also share what they derive from it (the whitening factor).
    """

    def __init__(self, model: nn.Module, names: list[str], statistic: str):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
        self.statistic = statistic
        self.sums: dict[str, torch.Tensor | None] = {n: None for n in names}
        self.tokens = {n: 0 for n in names}
        self.mask: torch.Tensor | None = None  # attention mask of the batch being run (None: no padding)
        self._last: tuple[torch.Tensor, str, torch.Tensor, int] | None = None  # (input, layer, total, tokens)
        self._leaders: dict[str, set[str]] = {n: set() for n in names}  # whose total each layer reused
        self._handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _total(self, raw: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = raw.detach().reshape(-1, raw.shape[-1])
        if self.mask is not None:
            x = x[self.mask.reshape(-1).bool()]
        if self.statistic == "mean_square":
            return x.float().pow(2).sum(dim=0), x.shape[0]
        x = x.double()  # float64: the whitening factor is taken from this matrix and must stay positive definite
        return x.T @ x, x.shape[0]

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            raw = args[0]
            if self._last is not None and self._last[0] is raw:
                _, leader, total, count = self._last
            else:
                (total, count), leader = self._total(raw), name
                self._last = (raw, name, total, count)
            self._leaders[name].add(leader)
            self.sums[name] = total if self.sums[name] is None else self.sums[name] + total
            self.tokens[name] += count
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._last = None

    def means(self) -> dict[str, torch.Tensor]:
        if any(t == 0 for t in self.tokens.values()):
            raise ValueError(f"No calibration token reached {[n for n, t in self.tokens.items() if t == 0]}; "
                             "pass non-empty calibration batches.")
        means = {}
        for name in self.sums:
            leaders = self._leaders[name]
            # Same input as an earlier layer in every batch: share that layer's mean tensor.
            shared = next(iter(leaders)) if len(leaders) == 1 else name
            means[name] = means[shared] if shared in means else self.sums[name] / self.tokens[name]
        return means


def first_batches(data, limit: int | None, method: str, device: torch.device | None = None) -> list[dict]:
    """The first ``limit`` batches (all with None) of a list or dataloader of token batches, on ``device``.

    Labels are kept: the block-wise passes drop them (``_model_inputs``)."""
    if data is None:
        raise ValueError(f"{method} needs calibration data: a list or dataloader of token-id batches; got None.")
    batches = [{k: v.to(device) if device is not None else v for k, v in batch.items()}
               for batch in itertools.islice(data, limit)]
    if not batches:
        raise ValueError(f"{method} got no calibration batch.")
    return batches


def _model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        # A KV cache would collect keys from the first run of a block and show them again to its second run.
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def input_statistics(model: nn.Module, block: str, names: list[str], batches: list[dict[str, torch.Tensor]],
                     statistic: str = "mean_square") -> dict[str, torch.Tensor]:
    """``statistic`` of the input of each named linear layer, by running the whole model up to ``block``.

    The reference path (one model run per call); :func:`blockwise` gives the same numbers for every block
    at the cost of about two model runs in all.
    """
    collector = _InputStatistics(model, names, statistic)

    def stop(module, args, output):
        raise _StopForward

    stopper = model.get_submodule(block).register_forward_hook(stop)
    try:
        for batch in batches:
            collector.mask = batch.get("attention_mask")
            try:
                model(**_model_inputs(model, batch))
            except _StopForward:
                pass
    finally:
        stopper.remove()
        collector.remove()
    return collector.means()


def input_mean_squares(model: nn.Module, block: str, names: list[str],
                       batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of the squared input of each named linear layer (one value per channel)."""
    return input_statistics(model, block, names, batches, "mean_square")


@torch.no_grad()
def _capture_block_calls(model: nn.Module, blocks: list[str], batches: list[dict[str, torch.Tensor]]):
    """For each batch: the first block's input and, per block, the other arguments it is called with.

    Masks and position embeddings can differ between blocks (sliding-window layers), so they are recorded
    for every block; the model run stops when the last block is reached.
    """
    first_inputs, calls = [], {b: [] for b in blocks}

    def record(block: str) -> Callable:
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if block == blocks[0]:
                first_inputs.append(hidden)
            calls[block].append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if block == blocks[-1]:
                raise _StopForward
        return hook

    handles = [model.get_submodule(b).register_forward_pre_hook(record(b), with_kwargs=True) for b in blocks]
    try:
        for batch in batches:
            try:
                model(**_model_inputs(model, batch))
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(first_inputs) != len(batches) or any(len(c) != len(batches) for c in calls.values()):
        raise ValueError(f"Not every calibration batch reached every block of {blocks[0]!r}..{blocks[-1]!r}; "
                         "block-by-block calibration needs blocks that every forward pass runs.")
    return first_inputs, calls


def _run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[tuple[tuple, dict]],
               collector: _InputStatistics | None, masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
    outputs = []
    for x, (args, kwargs), mask in zip(hidden, calls, masks):
        if collector is not None:
            collector.mask = mask
        out = block(x, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


@torch.no_grad()
def blockwise(model: nn.Module, names: Iterable[str], batches: list[dict[str, torch.Tensor]],
              compress_block: Callable[[str, list[str], dict[str, torch.Tensor]], None], desc: str,
              statistic: str = "mean_square") -> None:
    """Calibrate and compress one block at a time, in model order, each block fed by the compressed previous ones.

    ``compress_block(block, names, stats)`` gets the block's name, its targeted layers and their input
    ``statistic``, and may replace those layers (in place, by full module name).
    """
    if not batches:
        raise ValueError("Calibration needs at least one batch of token ids.")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
    grouped = group_by_block(names)
    blocks = list(grouped)
    was_training = model.training
    model.eval()
    try:
        hidden, calls = _capture_block_calls(model, blocks, batches)
        masks = [batch.get("attention_mask") for batch in batches]
        for i, block in enumerate(tqdm(blocks, desc=desc)):
            module = model.get_submodule(block)
            collector = _InputStatistics(model, grouped[block], statistic)
            try:
                _run_block(module, hidden, calls[block], collector, masks)
            finally:
                collector.remove()
            compress_block(block, grouped[block], collector.means())
            if i + 1 < len(blocks):  # the next block sees this block's compressed output
                hidden = _run_block(module, hidden, calls[block], None, masks)
    finally:
        model.train(was_training)
