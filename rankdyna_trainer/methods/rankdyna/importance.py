"""Per-step importance of singular groups.

Two scores (``RankDynaConfig.importance``):

* ``"sensitivity"`` (AdaLoRA's): for each element ``w`` with gradient ``g``: ``I = |w * g|``,
  ``I_bar <- b1 I_bar + (1-b1) I`` and ``U_bar <- b2 U_bar + (1-b2) |I - I_bar|``; the element score is
  ``I_bar * U_bar``. A group's score is its gate score plus the mean score of its column of ``U`` and of its row
  of ``V``.
* ``"fisher"``: ``F <- b1 F + (1-b1) (dL/dgate)^2``, the Fisher information of the group's gate. Removing a group
  moves the gate from 1 to 0, which raises the loss by about ``F / 2`` to second order (``dL/dgate = s dL/ds``,
  so this is ``s^2 E[(dL/ds)^2]``, the Fisher view of FWSVD). Unlike ``|s g|``, whose sign flips from batch to
  batch near a minimum, it does not average out, and it is in units of loss for every matrix alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dtensors import local, local_row_indices, mesh_group
from .layer import SVDLinear

SINGULAR_VALUE_SIGNALS = ("gate", "singular_value")
IMPORTANCE_SCORES = ("sensitivity", "fisher")


def memory_steps(beta1: float, beta2: float) -> int:
    """Steps after which the scores no longer show an old step: every statistic is an exponential average that keeps
    ``beta`` of its past per step, so a step this many steps back weighs less than 2**-24 (float32's resolution) of
    a new one, and scores started this long before they are first read are those of scoring from step 0."""
    keep = max(beta1, beta2)
    return 0 if keep <= 0 else math.floor(24 * math.log(2) / -math.log(keep)) + 1  # keep**n < 2**-24


def _masked_lerp_(averages: list[torch.Tensor], values: list[torch.Tensor], weight: float,
                  mask: list[torch.Tensor] | None) -> None:
    """``average <- average + weight * (value - average)``, only where ``mask`` is 1 (everywhere when None)."""
    if mask is None:
        torch._foreach_lerp_(averages, values, weight)
    else:
        torch._foreach_lerp_(averages, values, torch._foreach_mul([m.to(a.dtype) for m, a in zip(mask, averages)],
                                                                  weight))


class SingularGroupScores:
    """Keeps the importance buffers of a set of :class:`SVDLinear` layers up to date.

    All updates are batched over layers with ``torch._foreach_*`` kernels; a step whose gradients are not
    finite leaves every statistic unchanged and is counted in ``skipped_steps``.
    """

    def __init__(self, layers: list[SVDLinear], beta1: float = 0.85, beta2: float = 0.85,
                 singular_value_signal: str = "gate", importance: str = "sensitivity"):
        if not layers:
            raise ValueError("SingularGroupScores needs at least one SVDLinear layer.")
        if singular_value_signal not in SINGULAR_VALUE_SIGNALS:
            raise ValueError(f"singular_value_signal must be one of {SINGULAR_VALUE_SIGNALS}, "
                             f"got {singular_value_signal!r}.")
        if importance not in IMPORTANCE_SCORES:
            raise ValueError(f"importance must be one of {IMPORTANCE_SCORES}, got {importance!r}.")
        if importance == "sensitivity" and not all(l.has_element_statistics for l in layers):
            raise ValueError("The 'sensitivity' importance needs SVDLinear layers built with element_statistics=True.")
        self.layers = layers
        self.beta1, self.beta2 = beta1, beta2
        self.singular_value_signal = singular_value_signal
        self.importance = importance
        self.skipped_steps = 0
        # FSDP2: U and V (and their element statistics) are Shard(0) DTensors; the statistics are updated on this
        # rank's shard, and group sums are all-reduced over this group (None when nothing is sharded).
        self._shard_group = mesh_group([p for l in layers for p in (l.U, l.V)]) if importance == "sensitivity" else None
        if self._shard_group is not None and singular_value_signal != "gate":
            raise ValueError("singular_value_signal='singular_value' reads each singular value's own gradient, which "
                             "FSDP shards; use the default 'gate' signal with a sharded model.")
        if importance == "sensitivity":
            # Local views: in-place updates of a shard update the DTensor buffer itself.
            self._sensitivity = [local(getattr(l, f"sensitivity_{p}")) for p in ("U", "V", "gate") for l in layers]
            self._uncertainty = [local(getattr(l, f"uncertainty_{p}")) for p in ("U", "V", "gate") for l in layers]
            self._V_rows = [local_row_indices(l.V) for l in layers] if self._shard_group is not None else None
        self._fisher = [l.gate_fisher for l in layers]
        self._factor_instant: list[torch.Tensor] | None = None
        self._factors_finite: torch.Tensor | None = None

    def gate_grads(self) -> list[torch.Tensor]:
        return [l.gate_grad for l in self.layers]

    @property
    def sharded(self) -> bool:
        return self._shard_group is not None

    def _factor_sensitivity(self) -> list[torch.Tensor]:
        """``|w * g|`` of every element of ``U`` then ``V`` (this rank's shard when sharded)."""
        params = [local(l.U) for l in self.layers] + [local(l.V) for l in self.layers]
        grads = [local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
                 for p in [l.U for l in self.layers] + [l.V for l in self.layers]]
        # Invariant to the factor_scale multiplier: (U / a) * (a dL/dU) = U * dL/dU.
        return torch._foreach_mul([p.detach() for p in params], grads)

    @torch.no_grad()
    def local_factor_probe(self) -> torch.Tensor | None:
        """Sharded ``sensitivity`` only (else None): the summed norms of this rank's ``|w * g|`` shards, which the
        caller all-reduces with the gate gradients and passes to :meth:`agree_on_factors`, so that every rank skips
        (or keeps) a step with a non-finite factor gradient alike. The shards are kept for :meth:`update`."""
        if not self.sharded or self.importance != "sensitivity":
            return None
        self._factor_instant = self._factor_sensitivity()
        return torch.stack(torch._foreach_norm(self._factor_instant)).sum()

    def agree_on_factors(self, reduced_probe: torch.Tensor) -> None:
        self._factors_finite = reduced_probe.isfinite()

    def _instant_sensitivity(self, grad_scale: torch.Tensor | float) -> list[torch.Tensor]:
        sensitivity, self._factor_instant = self._factor_instant or self._factor_sensitivity(), None
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
    def update(self, grad_scale: torch.Tensor | float = 1.0, scored: list[torch.Tensor] | None = None) -> bool:
        """Fold the current gradients into the statistics (call once per optimizer step, before zero_grad).

        ``grad_scale`` divides the gate gradients, for loss scaling that the optimizer unscales only for
        parameters. ``scored`` (0/1 per group, one tensor per layer; None: all) marks the groups this step's
        gradients measured: after a kept-groups-only step (rankdyna.kept_compute) the masked groups' gate
        gradients are absent, not zero, so their statistics are left as they were. Returns False (and changes
        nothing) when a gradient is not finite. That check is the one host synchronisation per step; the Trainer
        already synchronises on the loss every step.
        """
        if self.importance == "fisher":
            return self._update_fisher(grad_scale, scored)
        instant = self._instant_sensitivity(grad_scale)
        if self._factors_finite is not None:
            # Sharded: this rank sees only its factor shards, so decide on the all-reduced probe and the
            # (replicated) gate part, the same on every rank.
            n = 2 * len(self.layers)
            finite = torch.stack(torch._foreach_norm(instant[n:])).isfinite().all() & self._factors_finite
            self._factors_finite = None
        else:
            finite = torch.stack(torch._foreach_norm(instant)).isfinite().all()
        if not bool(finite):
            self.skipped_steps += 1
            return False
        n = 2 * len(self.layers)  # the U and V statistics come first, the gates' last
        _masked_lerp_(self._sensitivity[:n], instant[:n], 1.0 - self.beta1, None)
        _masked_lerp_(self._sensitivity[n:], instant[n:], 1.0 - self.beta1, scored)
        deviation = torch._foreach_sub(instant, self._sensitivity)
        torch._foreach_abs_(deviation)
        _masked_lerp_(self._uncertainty[:n], deviation[:n], 1.0 - self.beta2, None)
        _masked_lerp_(self._uncertainty[n:], deviation[n:], 1.0 - self.beta2, scored)
        return True

    def _update_fisher(self, grad_scale: torch.Tensor | float, scored: list[torch.Tensor] | None) -> bool:
        squared = torch._foreach_div(self.gate_grads(), grad_scale)
        torch._foreach_mul_(squared, squared)
        if not bool(torch.stack(torch._foreach_norm(squared)).isfinite().all()):
            self.skipped_steps += 1
            return False
        _masked_lerp_(self._fisher, squared, 1.0 - self.beta1, scored)
        return True

    def zero_gate_grads(self) -> None:
        torch._foreach_zero_(self.gate_grads())

    @torch.no_grad()
    def group_scores(self) -> list[torch.Tensor]:
        if self.importance == "fisher":
            return [f.clone() for f in self._fisher]
        element = torch._foreach_mul(self._sensitivity, self._uncertainty)
        n = len(self.layers)
        U_scores, V_scores, gate_scores = element[:n], element[n : 2 * n], element[2 * n :]
        if self.sharded:
            factor_means = self._sharded_factor_means(U_scores, V_scores)
        else:
            factor_means = [u.mean(dim=0) + v.mean(dim=1) for u, v in zip(U_scores, V_scores)]
        # Frozen groups (beyond a layer's trainable_rank) have no factor statistics: their score is the gate's.
        return [g + F.pad(m, (0, g.numel() - m.numel())) for m, g in zip(factor_means, gate_scores)]

    def _sharded_factor_means(self, U_scores: list[torch.Tensor], V_scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-group means of the element scores from this rank's shards: U's column sums are partial (rows are
        sharded), V's row sums are this rank's rows; one all-reduce of all of them for every layer."""
        import torch.distributed as dist

        U_sums = [u.sum(dim=0) for u in U_scores]
        V_sums = [u_sum.new_zeros(u_sum.shape).index_copy_(0, rows, v.sum(dim=1))
                  for u_sum, v, rows in zip(U_sums, V_scores, self._V_rows)]
        flat = torch.cat(U_sums + V_sums)
        dist.all_reduce(flat, group=self._shard_group)
        sums = flat.split([s.numel() for s in U_sums + V_sums])
        n = len(self.layers)
        return [u / l.out_features + v / l.in_features for u, v, l in zip(sums[:n], sums[n:], self.layers)]
