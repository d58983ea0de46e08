from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from torch import nn

from ...budget import check_budget_fraction
from ...targets import ROLES, table_roles


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
        metadata={"help": "Module-name suffixes (list) or a full-name regex; None: the linear layers of the "
                  "repeated blocks."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)

    def to_dict(self) -> dict:
        return asdict(self)


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
    qk_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Name suffixes of the query/key projections (the more low-rank matrices). None, for all four "
                  "role lists: the table rankdyna_trainer.targets.MODULE_ROLES for the model's type."},
    )
    vo_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Name suffixes of the value/output projections (given more rank)."}
    )
    ffn_in_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Name suffixes of the FFN layers whose output rows are the pruned channels."}
    )
    ffn_out_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Name suffixes of the FFN layers whose input columns are the pruned channels."}
    )
    max_calibration_batches: int = field(
        default=8,
        metadata={"help": "Batches of the dataloader used as calibration data when LoRAP runs through the method "
                  "registry (rankdyna_trainer.methods); >= 1."},
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
        given = [name for name in ROLES if getattr(self, name) is not None]
        if given and len(given) < len(ROLES):
            raise ValueError(f"Pass all of {list(ROLES)} or none of them (the table for the model's type); got only "
                             f"{given}.")
        for name in given:
            if not getattr(self, name):
                raise ValueError(f"{name} must name at least one module suffix.")
        if not isinstance(self.max_calibration_batches, int) or self.max_calibration_batches < 1:
            raise ValueError(f"max_calibration_batches must be an integer >= 1, got {self.max_calibration_batches!r}.")

    def module_roles(self, model: nn.Module) -> dict[str, list[str]]:
        """Role -> name suffixes: the ones given, or the table entry for the model's type."""
        if self.qk_modules is not None:
            return {name: list(getattr(self, name)) for name in ROLES}
        return table_roles(model, "LoRAP", "qk_modules, vo_modules, ffn_in_modules and ffn_out_modules")

    def to_dict(self) -> dict:
        return asdict(self)
