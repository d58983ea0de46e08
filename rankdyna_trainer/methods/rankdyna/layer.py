from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class SVDLinear(nn.Module):
    """A linear layer trained in factorized form ``W = U diag(s * gate) V``.

    ``U`` (out x r), ``s`` (r) and ``V`` (r x in) are trainable; ``gate`` is a 0/1 buffer over singular groups
    set by the allocation. Masked groups keep their ``s``, so a group that is given back later resumes from
    its value instead of from zero. The gradient of the loss with respect to the gate is accumulated in
    ``gate_grad``: for a kept group it equals ``s_i * dL/ds_i`` (AdaLoRA's sensitivity of the singular value),
    and for a masked group it is the first-order change in loss from re-adding it, which keeps masked
    groups' scores informative.

    The importance statistics live here as buffers so that Trainer checkpoints carry them and a resumed run
    continues with the same scores.
    """

    # Set for a layer made from a transformers Conv1D, so that a dense export restores that module type.
    exports_as_conv1d = False

    def __init__(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = U.shape[0], V.shape[1]
        self.U = nn.Parameter(U)
        self.s = nn.Parameter(s)
        self.V = nn.Parameter(V)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.register_buffer("gate", torch.ones_like(s))
        self.register_buffer("gate_grad", torch.zeros_like(s), persistent=False)
        for part, like in (("U", U), ("V", V), ("gate", s)):
            self.register_buffer(f"sensitivity_{part}", torch.zeros_like(like))
            self.register_buffer(f"uncertainty_{part}", torch.zeros_like(like))

    @classmethod
    def from_linear(cls, linear: nn.Linear | Conv1D, rank: int | None = None) -> "SVDLinear":
        weight = linear.weight.detach()
        if isinstance(linear, Conv1D):  # GPT-2's Conv1D stores the weight as in x out
            weight = weight.T
        U, s, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        if rank is not None:
            U, s, Vh = U[:, :rank], s[:rank], Vh[:rank]
        dtype = weight.dtype
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls(U.to(dtype).contiguous(), s.to(dtype), Vh.to(dtype).contiguous(), bias)
        layer.exports_as_conv1d = isinstance(linear, Conv1D)
        return layer

    @property
    def max_rank(self) -> int:
        return self.s.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, max_rank={self.max_rank}"

    def _gate(self) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.training):
            return self.gate
        # A fresh leaf per forward: its gradient is summed into gate_grad, so gradient accumulation over
        # micro-batches adds up exactly like parameter gradients do.
        gate = self.gate.detach().requires_grad_(True)
        gate.register_hook(self._accumulate_gate_grad)
        return gate

    def _accumulate_gate_grad(self, grad: torch.Tensor) -> None:
        self.gate_grad.add_(grad.to(self.gate_grad.dtype))

    def effective_weight(self) -> torch.Tensor:
        return (self.U * (self.s * self.gate)) @ self.V

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight the gates currently keep, detached: for code that reads ``.weight``
        (T5's feed-forward reads ``wo.weight.dtype``). Training goes through ``forward``, never through this."""
        with torch.no_grad():
            return self.effective_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s_eff = self.s * self._gate()
        tokens = x.numel() // self.in_features
        m, n, r = self.out_features, self.in_features, self.max_rank
        # Same result either way; pick the cheaper multiply from static shapes (no host sync).
        if tokens * r * (m + n) <= m * r * n + tokens * m * n:
            return F.linear(F.linear(x, self.V) * s_eff, self.U, self.bias)
        return F.linear(x, (self.U * s_eff) @ self.V, self.bias)

    def orthogonality_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.max_rank, device=self.U.device, dtype=self.U.dtype)
        return torch.linalg.matrix_norm(self.U.T @ self.U - eye) + torch.linalg.matrix_norm(self.V @ self.V.T - eye)
