from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...factorize import Factorization


class MaskedFactorizedLinear(nn.Module):
    """A frozen ``left @ diag(s * mask) @ right`` (+ bias) whose ``mask`` over singular groups is set from
    outside before each forward (by the hypernetwork), so gradients reach the mask and nothing else here."""

    def __init__(self, fact: Factorization, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("left", fact.left.detach().clone())
        self.register_buffer("s", fact.s.detach().clone())
        self.register_buffer("right", fact.right.detach().clone())
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.s if self.mask is None else self.s * self.mask
        return F.linear(F.linear(x, self.right.to(x.dtype)) * scale.to(x.dtype), self.left.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))


class RankMaskHypernetwork(nn.Module):
    """Mask logits for every matrix from one fixed random code: a bidirectional GRU runs over the matrices in
    model order (so neighbouring layers share information) and a linear head per matrix emits one logit per
    singular group. Head biases start on a descending ramp so that, before training, larger groups are
    likelier to be kept."""

    def __init__(self, group_counts: list[int], hidden_size: int = 64, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("code", torch.randn(1, len(group_counts), hidden_size, generator=generator))
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleList(nn.Linear(2 * hidden_size, k) for k in group_counts)
        with torch.no_grad():
            for head, k in zip(self.heads, group_counts):
                head.weight.mul_(0.1)
                head.bias.copy_(torch.linspace(4.0, 0.0, k))

    def forward(self) -> list[torch.Tensor]:
        states, _ = self.gru(self.code)
        return [head(states[0, i]) for i, head in enumerate(self.heads)]


def gumbel_sigmoid_straight_through(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard 0/1 sample in the forward pass, the relaxed sample's gradient in the backward pass."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + uniform.log() - (-uniform).log1p()) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


def alignment_penalty(probabilities: list[torch.Tensor]) -> torch.Tensor:
    """Mean over matrices of ``sum_i relu(p_{i+1} - p_i)``: zero exactly when keep probabilities never rise
    down the spectrum, i.e. kept groups sit at its top."""
    return torch.stack([(p[1:] - p[:-1]).relu().sum() for p in probabilities]).mean()


def budget_penalty(masks: list[torch.Tensor], shapes: list[tuple[int, int]], budget_params: int) -> torch.Tensor:
    """``(cost / budget - 1)^2`` with ``cost = sum_k rank_k (m_k + n_k)`` of the sampled masks."""
    costs = torch.stack([m.sum() * (rows + cols) for m, (rows, cols) in zip(masks, shapes)])
    return (costs.sum() / budget_params - 1).square()
