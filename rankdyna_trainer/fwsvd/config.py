from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ..budget import check_budget_fraction


@dataclass
class FWSVDConfig:
    """Fisher-weighted SVD (Hsu et al., ICLR 2022) at (near) uniform rank under one parameter budget."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-name regex (str) of the nn.Linear layers to "
                  "factorize; None uses the architecture's defaults."},
    )
    target_budget: float = field(
        default=0.5,
        metadata={"help": "Parameter budget as a fraction of the dense weights of the targeted matrices, in (0, 1]."},
    )
    max_fisher_batches: Optional[int] = field(
        default=None,
        metadata={"help": "Batches of task data to accumulate Fisher information over (None: the whole dataloader)."},
    )
    fisher_floor: float = field(
        default=1e-6,
        metadata={"help": "Added to each Fisher weight, relative to the matrix's mean Fisher, so rows (or "
                  "elements) with no gradient keep a small positive weight; >= 0."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is an empty list; pass None for the architecture's defaults.")
        if self.max_fisher_batches is not None and (not isinstance(self.max_fisher_batches, int)
                                                    or self.max_fisher_batches < 1):
            raise ValueError(f"max_fisher_batches must be None or an integer >= 1, got {self.max_fisher_batches!r}.")
        if self.fisher_floor < 0:
            raise ValueError(f"fisher_floor must be >= 0, got {self.fisher_floor}.")

    def to_dict(self) -> dict:
        return asdict(self)
