"""Per-step importance of singular groups: AdaLoRA's smoothed sensitivity times uncertainty.

For each element ``w`` with gradient ``g``: ``I = |w * g|``, ``I_bar <- b1 I_bar + (1-b1) I`` and
``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``; the element score is ``I_bar * U_bar``. A group's score is
its gate score plus the mean score of its column of ``U`` and of its row of ``V``.
"""

from __future__ import annotations

import torch

from .layer import SVDLinear

SINGULAR_VALUE_SIGNALS = ("gate", "singular_value")


class SingularGroupScores:
    """Keeps the importance buffers of a set of :class:`SVDLinear` layers up to date.

    All updates are batched over layers with ``torch._foreach_*`` kernels; a step whose gradients are not
    finite leaves every statistic unchanged and is counted in ``skipped_steps``.
    """

    def __init__(self, layers: list[SVDLinear], beta1: float = 0.85, beta2: float = 0.85,
                 singular_value_signal: str = "gate"):
        if not layers:
            raise ValueError("SingularGroupScores needs at least one SVDLinear layer.")
        if singular_value_signal not in SINGULAR_VALUE_SIGNALS:
            raise ValueError(f"singular_value_signal must be one of {SINGULAR_VALUE_SIGNALS}, "
                             f"got {singular_value_signal!r}.")
        self.layers = layers
        self.beta1, self.beta2 = beta1, beta2
        self.singular_value_signal = singular_value_signal
        self.skipped_steps = 0
        self._sensitivity = [getattr(l, f"sensitivity_{p}") for p in ("U", "V", "gate") for l in layers]
        self._uncertainty = [getattr(l, f"uncertainty_{p}") for p in ("U", "V", "gate") for l in layers]

    def gate_grads(self) -> list[torch.Tensor]:
        return [l.gate_grad for l in self.layers]

    def _instant_sensitivity(self, grad_scale: torch.Tensor | float) -> list[torch.Tensor]:
        params = [l.U for l in self.layers] + [l.V for l in self.layers]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        sensitivity = torch._foreach_mul([p.detach() for p in params], grads)
        if self.singular_value_signal == "gate":
            # The gate gradient is the loss change per unit of gate: |s * dL/ds| for kept groups, and the
            # first-order gain of re-adding a masked group.
            sensitivity += torch._foreach_div(self.gate_grads(), grad_scale)
        else:  # AdaLoRA's |s * dL/ds| from the parameter gradient: zero for masked groups
            s_grads = [l.s.grad if l.s.grad is not None else torch.zeros_like(l.s) for l in self.layers]
            sensitivity += torch._foreach_mul([l.s.detach() for l in self.layers], s_grads)
        torch._foreach_abs_(sensitivity)
        return sensitivity

    @torch.no_grad()
    def update(self, grad_scale: torch.Tensor | float = 1.0) -> bool:
        """Fold the current gradients into the statistics (call once per optimizer step, before zero_grad).

        ``grad_scale`` divides the gate gradients, for loss scaling that the optimizer unscales only for
        parameters. Returns False (and changes nothing) when a gradient is not finite. That check is the one
        host synchronisation per step; the Trainer already synchronises on the loss every step.
        """
        instant = self._instant_sensitivity(grad_scale)
        if not bool(torch.stack(torch._foreach_norm(instant)).isfinite().all()):
            self.skipped_steps += 1
            return False
        torch._foreach_lerp_(self._sensitivity, instant, 1.0 - self.beta1)
        deviation = torch._foreach_sub(instant, self._sensitivity)
        torch._foreach_abs_(deviation)
        torch._foreach_lerp_(self._uncertainty, deviation, 1.0 - self.beta2)
        return True

    def zero_gate_grads(self) -> None:
        torch._foreach_zero_(self.gate_grads())

    @torch.no_grad()
    def group_scores(self) -> list[torch.Tensor]:
        element = torch._foreach_mul(self._sensitivity, self._uncertainty)
        n = len(self.layers)
        U_scores, V_scores, gate_scores = element[:n], element[n : 2 * n], element[2 * n :]
        return [g + u.mean(dim=0) + v.mean(dim=1) for u, v, g in zip(U_scores, V_scores, gate_scores)]
