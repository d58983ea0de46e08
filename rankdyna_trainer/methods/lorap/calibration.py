"""Input statistics of linear layers, collected block by block through the partly compressed model."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

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


@torch.no_grad()
def input_mean_squares(model: nn.Module, block: str, names: list[str],
                       batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of the squared input of each named linear layer (one value per input channel).

    The forward pass stops right after ``block``, so earlier blocks run in whatever (compressed) form they are
    in now: each block is calibrated on the inputs it will really see. Padding positions (``attention_mask``
    0) are excluded.
    """
    sums = {n: None for n in names}
    tokens = {n: 0 for n in names}
    mask_holder: dict[str, torch.Tensor | None] = {}

    def accumulate(name: str) -> Callable:
        def hook(module, args):
            x = args[0].detach().float()
            mask = mask_holder.get("mask")
            x = x.reshape(-1, x.shape[-1])
            if mask is not None:
                x = x[mask.reshape(-1).bool()]
            sq = x.pow(2).sum(dim=0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
            tokens[name] += x.shape[0]
        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = [model.get_submodule(n).register_forward_pre_hook(accumulate(n)) for n in names]
    handles.append(model.get_submodule(block).register_forward_hook(stop))
    try:
        for batch in batches:
            mask_holder["mask"] = batch.get("attention_mask")
            try:
                model(**{k: v for k, v in batch.items() if k != "labels"})
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    if any(t == 0 for t in tokens.values()):
        raise ValueError(f"No calibration token reached {[n for n, t in tokens.items() if t == 0]}; "
                         "pass non-empty calibration batches.")
    return {n: sums[n] / tokens[n] for n in names}


def blockwise(model: nn.Module, names: Iterable[str], batches: list[dict[str, torch.Tensor]],
              compress_block: Callable[[str, list[str], dict[str, torch.Tensor]], None], desc: str) -> None:
    """Calibrate and compress one block at a time, in model order (each block fed by the compressed previous ones)."""
    if not batches:
        raise ValueError("Calibration needs at least one batch of token ids.")
    was_training = model.training
    model.eval()
    for block, block_names in tqdm(group_by_block(names).items(), desc=desc):
        stats = input_mean_squares(model, block, block_names, batches)
        compress_block(block, block_names, stats)
    model.train(was_training)
