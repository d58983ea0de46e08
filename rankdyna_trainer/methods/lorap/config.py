from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...budget import check_budget_fraction


@dataclass
class LowRankSVDConfig:
    """Post-training truncated SVD of every targeted matrix at one uniform parameter fraction.

    With ``activation_weighted=True`` each matrix is factorized as ``SVD(W diag(a)) diag(a)^-1`` where ``a_j``
    is the root mean square of input channel ``j`` over a calibration set (LoRAP's weighted SVD, applied to
    every matrix); otherwise it is the plain SVD of ``W``.
    """

    target_budget: float = field(
        default=0.5,
        metadata={"help": "Parameters kept, as a fraction of the dense parameters of the targeted matrices, "
                  "in (0, 1]."},
    )
    activation_weighted: bool = field(
        default=False, metadata={"help": "Weight input channels by their calibration RMS before the SVD."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-name regex; None: architecture defaults."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)


@dataclass
class LoRAPConfig:
    """LoRAP (Li et al., 2024): activation-weighted SVD for attention, structured channel pruning for the FFN.

    Both sub-layers of every block keep ``target_budget`` of their dense weight parameters, so the whole
    model meets the same budget the other methods use.
    """

    target_budget: float = field(
        default=0.5,
        metadata={"help": "Parameters kept, as a fraction of the dense parameters of the targeted matrices, "
                  "in (0, 1]."},
    )
    qk_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj"],
        metadata={"help": "Name suffixes of the query/key projections (the more low-rank matrices)."},
    )
    vo_modules: list[str] = field(
        default_factory=lambda: ["v_proj", "o_proj"],
        metadata={"help": "Name suffixes of the value/output projections (given more rank)."},
    )
    ffn_in_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj"],
        metadata={"help": "Name suffixes of the FFN layers whose output rows are the pruned channels."},
    )
    ffn_out_modules: list[str] = field(
        default_factory=lambda: ["down_proj"],
        metadata={"help": "Name suffixes of the FFN layers whose input columns are the pruned channels."},
    )
    vo_rank_ratio: float = field(
        default=2.0,
        metadata={"help": "Rank of each V/O projection divided by the rank of each Q/K projection (>= 1). LoRAP "
                  "finds Q/K more low-rank than V/O and gives V/O the larger share of the attention budget."},
    )
    protected_fraction: float = field(
        default=0.01,
        metadata={"help": "Fraction of FFN channels with the LOWEST scores that are always kept (LoRAP found that "
                  "pruning this bottom 1% hurts), in [0, 1)."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        if self.vo_rank_ratio < 1.0:
            raise ValueError(f"vo_rank_ratio must be >= 1 (V/O get at least the rank of Q/K), "
                             f"got {self.vo_rank_ratio}.")
        if not 0.0 <= self.protected_fraction < 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1), got {self.protected_fraction}.")
        for name in ("qk_modules", "vo_modules", "ffn_in_modules", "ffn_out_modules"):
            if not getattr(self, name):
                raise ValueError(f"{name} must name at least one module suffix.")

    @property
    def target_modules(self) -> list[str]:
        return [*self.qk_modules, *self.vo_modules, *self.ffn_in_modules, *self.ffn_out_modules]
