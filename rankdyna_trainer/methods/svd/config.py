from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...budget import check_budget_fraction


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

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is an empty list; pass None for the architecture's defaults.")

    def to_dict(self) -> dict:
        return asdict(self)
