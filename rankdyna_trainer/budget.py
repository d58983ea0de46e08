"""One global parameter budget shared by every compression method.

A singular group of an ``m x n`` matrix costs ``m + n`` parameters, but a matrix never costs more than
its dense ``m * n``: past the break-even rank it is cheaper to store it dense, so further groups are free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import pad_sequence


def check_budget_fraction(value: float, name: str = "target_budget") -> None:
    """Every method's budget is a fraction of the dense targeted weights, in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}.")


def matrix_cost(rank: int, out_features: int, in_features: int) -> int:
    """Parameters needed to store a rank-``rank`` ``out_features x in_features`` matrix (factorized or dense)."""
    return min(rank * (out_features + in_features), out_features * in_features)


def keeps_dense(rank: int, out_features: int, in_features: int) -> bool:
    """Whether storing the matrix dense is no larger than storing its ``rank`` factors."""
    return rank * (out_features + in_features) >= out_features * in_features


@dataclass(frozen=True)
class ParameterBudget:
    """Cubic budget schedule over optimizer steps (AdaLoRA's schedule, counted in parameters).

    ``[0, warmup_steps)``: no pruning, scores accumulate. ``[warmup_steps, final_start)``: the budget falls
    cubically from the initial to the target and groups are reallocated every ``interval`` steps.
    ``[final_start, total_steps)``: one last allocation at the target, then the pattern is frozen.
    """

    dense_params: int
    initial_fraction: float
    target_fraction: float
    total_steps: int
    warmup_steps: int
    final_steps: int
    interval: int = 1
    score_from: int = 0  # the first step whose gradients enter the scores (RankDynaCallback sets it)

    @classmethod
    def from_fractions(
        cls,
        dense_params: int,
        initial_fraction: float,
        target_fraction: float,
        total_steps: int,
        warmup_fraction: float,
        final_fraction: float,
        interval: int = 1,
    ) -> "ParameterBudget":
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                f"The number of optimizer steps must be known and positive to schedule the budget, got "
                f"{total_steps!r}. Set `max_steps` in TrainingArguments when the dataset has no length."
            )
        warmup_steps = round(warmup_fraction * total_steps)
        # At least one: the last allocation, at the target, happens on step total_steps - final_steps, and a run
        # whose final phase rounds to zero steps would otherwise end above its budget.
        final_steps = max(1, round(final_fraction * total_steps))
        if total_steps - warmup_steps - final_steps < 1:
            raise ValueError(
                f"The schedule leaves no step to prune in: {total_steps} steps with warmup_fraction="
                f"{warmup_fraction} ({warmup_steps} steps) and final_fraction={final_fraction} ({final_steps} "
                "steps). Train for more steps or lower the two fractions."
            )
        return cls(dense_params, initial_fraction, target_fraction, total_steps, warmup_steps, final_steps, interval)

    @property
    def final_start(self) -> int:
        return self.total_steps - self.final_steps

    def fraction_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_fraction
        if step >= self.final_start:
            return self.target_fraction
        progress = (step - self.warmup_steps) / (self.final_start - self.warmup_steps)
        return self.target_fraction + (self.initial_fraction - self.target_fraction) * (1 - progress) ** 3

    def params_at(self, step: int) -> int:
        return int(self.fraction_at(step) * self.dense_params)

    def is_reallocation_step(self, step: int) -> bool:
        if step == self.final_start:
            return True
        in_pruning = self.warmup_steps <= step < self.final_start
        return in_pruning and (step - self.warmup_steps) % self.interval == 0

    def scoring_from(self, memory: int) -> "ParameterBudget":
        """This schedule with scores starting ``memory`` steps before the first reallocation reads them (the scores'
        memory: rankdyna.importance.memory_steps)."""
        return replace(self, score_from=max(0, self.warmup_steps - memory))

    def tracks_scores(self, step: int) -> bool:
        """Scores are needed from ``score_from`` up to and including the last allocation."""
        return self.score_from <= step <= self.final_start


def check_rank_multiple(value: int, name: str = "rank_multiple") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (1: any rank; 8 or 16: hardware-friendly), got {value!r}.")


def allocate_groups(
    scores: list[torch.Tensor], shapes: list[tuple[int, int]], budget_params: int, min_rank: int = 0,
    rank_multiple: int = 1,
) -> list[torch.Tensor]:
    """Keep the highest-scoring singular groups of all ``(m, n)`` matrices together within ``budget_params``:
    :func:`allocate_by_cost` with a group of a matrix costing ``m + n`` up to the matrix's dense ``m * n``."""
    return allocate_by_cost(scores, [(m + n, m * n) for m, n in shapes], budget_params, min_rank, rank_multiple)


def allocate_by_cost(
    scores: list[torch.Tensor], costs: list[tuple[int, int]], budget_params: int, min_rank: int = 0,
    rank_multiple: int = 1,
) -> list[torch.Tensor]:
    """Keep the highest-scoring groups of all items together within ``budget_params``.

    ``costs`` gives each item's ``(group_cost, full_cost)``: a singular group of an ``m x n`` matrix costs
    ``m + n`` and the matrix never more than its dense ``m * n``; an FFN channel costs the weights that read and
    write it, and the FFN its channels' sum (so it has no break-even before every channel is kept).

    Greedy by score over the marginal cost of each group (``m + n`` until the matrix reaches its dense
    size, zero after). Matrices that end up at or past break-even keep all their groups, since they are
    stored dense anyway. Runs as a handful of batched tensor ops with no host synchronisation.

    ``min_rank`` groups of each matrix (its best-scoring ones) are taken first, whatever the other matrices'
    scores, so no matrix drops below that rank while the budget can pay for the floor.

    ``rank_multiple`` ``k > 1`` allocates in blocks of ``k`` consecutive groups (in each matrix's score order),
    scored by their mean and charged their whole cost, so every kept rank is a multiple of ``k`` (or the
    matrix's full rank, or dense): GEMMs with a multiple of 8 or 16 in the inner dimension run closer to
    their FLOP count on CPUs and tensor cores. The rounded ranks are counted in the budget like any others.

    Returns one boolean keep-mask per matrix, aligned with ``scores``.
    """
    check_rank_multiple(rank_multiple)
    device = scores[0].device
    k = rank_multiple
    lengths = torch.tensor([len(s) for s in scores], device=device)
    group_cost = torch.tensor([c for c, _ in costs], device=device, dtype=torch.int64)[:, None]
    dense_cost = torch.tensor([full for _, full in costs], device=device, dtype=torch.int64)[:, None]

    # -inf padding sorts last; the stable sort keeps any real -inf score ahead of the padding.
    padded = pad_sequence([s.detach().float() for s in scores], batch_first=True, padding_value=float("-inf"))
    width = -(-padded.shape[1] // k) * k  # room for whole blocks
    padded = torch.nn.functional.pad(padded, (0, width - padded.shape[1]), value=float("-inf"))
    sorted_scores, order = padded.sort(dim=1, descending=True, stable=True)
    position = torch.arange(1, width + 1, device=device)[None, :]
    valid = position <= lengths[:, None]

    # Blocks of k sorted groups: score = mean over the block's real groups (non-increasing along a matrix).
    block_valid = valid.view(len(scores), -1, k)
    counts = block_valid.sum(dim=2)
    real = sorted_scores.view(len(scores), -1, k).masked_fill(~block_valid, 0.0)
    block_scores = real.sum(dim=2) / counts.clamp_min(1)
    block_end = torch.minimum(torch.arange(1, counts.shape[1] + 1, device=device)[None, :] * k, lengths[:, None])
    block_start = torch.arange(counts.shape[1], device=device)[None, :] * k
    if min_rank > 0:
        block_scores = block_scores.masked_fill((counts > 0) & (block_start < min_rank), float("inf"))
    marginal = torch.minimum(block_end * group_cost, dense_cost) - torch.minimum(block_start * group_cost, dense_cost)
    blocks = counts > 0

    flat_scores, flat_cost = block_scores[blocks], marginal.expand_as(blocks)[blocks]
    ranking = flat_scores.argsort(descending=True, stable=True)
    fits = flat_cost[ranking].cumsum(0) <= budget_params
    keep_flat = torch.zeros_like(fits)
    keep_flat[ranking] = fits

    keep_blocks = torch.zeros_like(blocks)
    keep_blocks[blocks] = keep_flat
    keep_sorted = keep_blocks.repeat_interleave(k, dim=1) & valid
    kept = keep_sorted.sum(dim=1, keepdim=True)
    dense_anyway = kept * group_cost >= dense_cost
    keep_sorted = keep_sorted | (dense_anyway & valid)

    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return [keep[i, : len(s)] for i, s in enumerate(scores)]
