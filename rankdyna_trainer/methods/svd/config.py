from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...budget import check_budget_fraction, check_rank_multiple


@dataclass
class SVDConfig:
    """Truncated SVD of every targeted matrix at (near) uniform rank under one parameter budget."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-name regex (str) of the nn.Linear / Conv1D "
                  "layers to factorize; None: those of the model's repeated blocks (as RankDyna does)."},
    )
    target_budget: float = field(
        default=0.5,
        metadata={"help": "Parameter budget as a fraction of the dense weights of the targeted matrices, in (0, 1]."},
    )
    rank_multiple: int = field(
        default=1,
        metadata={"help": "Keep ranks in multiples of this (>= 1; e.g. 8 for faster GEMMs on CPUs and tensor cores); "
                  "the rounded ranks are counted in the budget (see budget.allocate_groups)."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        check_rank_multiple(self.rank_multiple)
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is an empty list; pass None for the architecture's defaults.")

    def to_dict(self) -> dict:
        return asdict(self)
