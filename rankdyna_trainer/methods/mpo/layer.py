"""A linear layer whose weight is a matrix product operator: a chain of local tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def balanced_factors(n: int, count: int) -> list[int]:
    """``count`` integers with product ``n``, as equal as its prime factors allow, the largest in the middle
    (so the central tensor gets the largest local dimension)."""
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    factors = [1] * count
    for prime in sorted(primes, reverse=True):  # each prime into the currently smallest factor
        factors[factors.index(min(factors))] *= prime
    factors.sort(reverse=True)
    center = count // 2
    positions = [center] + [center + s * d for d in range(1, center + 1) for s in (-1, 1)]
    ordered = [0] * count
    for position, factor in zip(positions, factors):
        ordered[position] = factor
    return ordered


def mpo_decompose(weight: torch.Tensor, out_factors: list[int], in_factors: list[int],
                  max_bond: int | None = None) -> list[torch.Tensor]:
    """Split ``weight`` (out x in) into local tensors ``T_k`` of shape ``(bond_{k-1}, out_k, in_k, bond_k)``.

    SVDs sweep from the left end to the centre and from the right end to the centre, so every auxiliary
    tensor is orthonormal and the remaining weight (and all singular values) end up in the central tensor.
    Bonds are truncated to ``max_bond`` (None: exact).
    """
    K = len(out_factors)
    if len(in_factors) != K or math.prod(out_factors) != weight.shape[0] or math.prod(in_factors) != weight.shape[1]:
        raise ValueError(f"Factors {out_factors} x {in_factors} do not multiply to the weight shape "
                         f"{tuple(weight.shape)}.")
    center = K // 2
    # SVDs in at least float32 (half precision is not accurate enough), float64 stays float64.
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).reshape(*out_factors, *in_factors)
    # (o1, i1, o2, i2, ...): index pair k belongs to local tensor k.
    W = W.permute(*[j for k in range(K) for j in (k, K + k)])
    dims = [o * i for o, i in zip(out_factors, in_factors)]
    rest = W.reshape(1, *dims, 1)
    tensors: list[torch.Tensor | None] = [None] * K

    # Left sweep: peel tensors 0 .. center-1.
    for k in range(center):
        left_bond = rest.shape[0]
        matrix = rest.reshape(left_bond * dims[k], -1)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        bond = U.shape[1] if max_bond is None else min(max_bond, U.shape[1])
        tensors[k] = U[:, :bond].reshape(left_bond, out_factors[k], in_factors[k], bond)
        rest = (S[:bond, None] * Vh[:bond]).reshape(bond, *dims[k + 1 :], 1)
    # Right sweep: peel tensors K-1 .. center+1.
    for k in range(K - 1, center, -1):
        right_bond = rest.shape[-1]
        matrix = rest.reshape(-1, dims[k] * right_bond)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        bond = U.shape[1] if max_bond is None else min(max_bond, U.shape[1])
        tensors[k] = Vh[:bond].reshape(bond, out_factors[k], in_factors[k], right_bond)
        rest = (U[:, :bond] * S[:bond]).reshape(*rest.shape[:-2], bond)
    tensors[center] = rest.reshape(rest.shape[0], out_factors[center], in_factors[center], rest.shape[-1])
    return [t.to(weight.dtype).contiguous() for t in tensors]


def mpo_contract(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The ``out x in`` matrix that a chain of local tensors represents (inverse of :func:`mpo_decompose`)."""
    K = len(tensors)
    chain = tensors[0]  # (1, o1, i1, b1)
    for t in tensors[1:]:
        chain = torch.tensordot(chain, t, dims=([chain.dim() - 1], [0]))
    chain = chain.reshape(chain.shape[1:-1])  # drop the two size-1 end bonds: (o1, i1, o2, i2, ...)
    out_f = math.prod(t.shape[1] for t in tensors)
    in_f = math.prod(t.shape[2] for t in tensors)
    return chain.permute(*range(0, 2 * K, 2), *range(1, 2 * K, 2)).reshape(out_f, in_f)


def mpo_params(out_factors: list[int], in_factors: list[int], bonds: list[int]) -> int:
    """Parameters of a chain with the given inner bonds (``len(bonds) == len(out_factors) - 1``)."""
    edges = [1, *bonds, 1]
    return sum(edges[k] * o * i * edges[k + 1] for k, (o, i) in enumerate(zip(out_factors, in_factors)))


def mpo_bonds(out_factors: list[int], in_factors: list[int], max_bond: int | None = None) -> list[int]:
    """Inner bond dimensions that :func:`mpo_decompose` produces (same sweeps, same caps), without any SVD."""
    dims = [o * i for o, i in zip(out_factors, in_factors)]
    K, center = len(dims), len(dims) // 2
    cap = math.inf if max_bond is None else max_bond
    bonds = [0] * (K - 1)
    left_bond = 1
    for k in range(center):
        left_bond = bonds[k] = min(left_bond * dims[k], math.prod(dims[k + 1 :]), cap)
    right_bond = 1
    for k in range(K - 1, center, -1):
        right_bond = bonds[k - 1] = min(left_bond * math.prod(dims[center:k]), dims[k] * right_bond, cap)
    return bonds


class MPOLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` the contraction of ``len(tensors)`` local tensors.

    ``tensors[center]`` is the central tensor; the others are auxiliary. The weight is contracted once per
    forward (the tensors are small), then applied as an ordinary matrix multiply.

    The central tensor is stored under the dense layer's parameter name ``weight`` (the auxiliary ones in
    ``auxiliary``): its 4-d shape differs from the dense weight's, so in a process where rankdyna_trainer is not
    imported transformers' loader stops with a size mismatch instead of initialising the layer at random.
    """

    def __init__(self, tensors: list[torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        if len(tensors) < 3 or len(tensors) % 2 == 0:
            raise ValueError(f"An MPO needs an odd number (>= 3) of local tensors, got {len(tensors)}.")
        center = len(tensors) // 2
        self.weight = nn.Parameter(tensors[center])
        self.auxiliary = nn.ParameterList([nn.Parameter(t) for k, t in enumerate(tensors) if k != center])
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.out_features = math.prod(t.shape[1] for t in tensors)
        self.in_features = math.prod(t.shape[2] for t in tensors)

    @property
    def center(self) -> int:
        return len(self.auxiliary) // 2

    @property
    def tensors(self) -> list[nn.Parameter]:
        """The local tensors in chain order (``tensors[center]`` is ``weight``)."""
        aux = list(self.auxiliary)
        return [*aux[: self.center], self.weight, *aux[self.center :]]

    @classmethod
    def from_linear(cls, linear: nn.Module, num_tensors: int = 3, max_bond: int | None = None) -> "MPOLinear":
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (whose weight is stored transposed)."""
        weight = linear.weight.T if isinstance(linear, Conv1D) else linear.weight
        out_features, in_features = weight.shape
        out_factors = balanced_factors(out_features, num_tensors)
        in_factors = balanced_factors(in_features, num_tensors)
        tensors = mpo_decompose(weight, out_factors, in_factors, max_bond)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(tensors, bias)

    @classmethod
    def from_shapes(cls, shapes: list[list[int]], bias: bool) -> "MPOLinear":
        tensors = [torch.zeros(s) for s in shapes]
        out_features = math.prod(s[1] for s in shapes)
        return cls(tensors, torch.zeros(out_features) if bias else None)

    def auxiliary_tensors(self) -> list[nn.Parameter]:
        return list(self.auxiliary)

    def dense_weight(self) -> torch.Tensor:
        return mpo_contract(self.tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def describe_for_export(self) -> dict:
        return {"type": "mpo", "in_features": self.in_features, "out_features": self.out_features,
                "shapes": [list(t.shape) for t in self.tensors], "bias": self.bias is not None,
                "params": self.num_params()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"shapes={[tuple(t.shape) for t in self.tensors]}")
