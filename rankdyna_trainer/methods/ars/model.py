"""ARS on the same footing as the other methods: learn masks, project them onto the budget, truncate."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from tqdm.auto import tqdm

from ...factorize import (
    allocate,
    budget_params,
    fisher_information,
    replace_with_kept_groups,
    svd_factorization,
    target_linears,
    target_shapes,
    target_weight,
)
from ...targets import set_submodule
from ..fwsvd.model import fwsvd_factorizations
from .config import ARSConfig
from .layer import (
    MaskedFactorizedLinear,
    RankMaskHypernetwork,
    alignment_penalty,
    budget_penalty,
    gumbel_sigmoid_straight_through,
)


def learn_rank_masks(model: nn.Module, masked: list[MaskedFactorizedLinear], shapes: list[tuple[int, int]],
                     dataloader, config: ARSConfig) -> tuple[list[torch.Tensor], list[dict]]:
    """Train the hypernetwork on the task loss of the masked, frozen model plus the two regularizers.

    Returns each matrix's keep probability per group and the per-step loss history.
    """
    device = masked[0].s.device
    hypernet = RankMaskHypernetwork([len(m.s) for m in masked], config.hidden_size).to(device)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=config.mask_learning_rate)
    target = budget_params(shapes, config.target_budget)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()  # no dropout: the masks should explain the task loss, not the noise
    history = []
    batches = itertools.cycle(dataloader)
    try:
        for _ in tqdm(range(config.mask_steps), desc="ARS mask learning"):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            logits = hypernet()
            masks = [gumbel_sigmoid_straight_through(l, config.temperature) for l in logits]
            for layer, mask in zip(masked, masks):
                layer.mask = mask
            task_loss = model(**batch).loss
            align = alignment_penalty([torch.sigmoid(l) for l in logits])
            budget = budget_penalty(masks, shapes, target)
            loss = task_loss + config.alignment_weight * align + config.budget_weight * budget
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"task_loss": task_loss.detach(), "alignment": align.detach(), "budget": budget.detach()})
    finally:
        for layer in masked:
            layer.mask = None
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        probabilities = [torch.sigmoid(l) for l in hypernet()]
    return probabilities, [{k: float(v) for k, v in h.items()} for h in history]


def compress_ars(model: nn.Module, config: ARSConfig, dataloader) -> dict[str, dict]:
    """Replace the targeted layers of ``model`` (in place, a fine-tuned model) by the groups that learned
    masks keep, projected onto the budget with :func:`~rankdyna_trainer.budget.allocate_groups`."""
    layers = target_linears(model, config.target_modules)
    shapes = target_shapes(layers)
    if config.factorization == "fwsvd":
        fisher = fisher_information(model, dataloader, layers, config.max_fisher_batches)
        factorizations = fwsvd_factorizations(layers, fisher, config.fisher_floor)
    else:
        factorizations = [svd_factorization(target_weight(l)) for l in layers.values()]
    masked = []
    for (name, linear), fact in zip(layers.items(), factorizations):
        layer = MaskedFactorizedLinear(fact, linear.bias).to(linear.weight.device)
        set_submodule(model, name, layer)
        masked.append(layer)
    try:
        probabilities, _ = learn_rank_masks(model, masked, shapes, dataloader, config)
    finally:
        for name, linear in layers.items():
            set_submodule(model, name, linear)
    # Equal probabilities (e.g. saturated at 1) go to the larger singular group first.
    scores = [p.float().cpu() - 1e-6 * torch.arange(len(p)) / len(p) for p in probabilities]
    keep = allocate(scores, shapes, config.target_budget, config.rank_multiple)
    return replace_with_kept_groups(model, layers, factorizations, keep, "ars", config.to_dict())
