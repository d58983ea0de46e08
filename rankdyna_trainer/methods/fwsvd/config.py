from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..svd.config import SVDConfig


@dataclass
class FWSVDConfig(SVDConfig):
    """Fisher-weighted SVD (Hsu et al., ICLR 2022) at (near) uniform rank under one parameter budget."""

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
        super().__post_init__()
        if self.max_fisher_batches is not None and (not isinstance(self.max_fisher_batches, int)
                                                    or self.max_fisher_batches < 1):
            raise ValueError(f"max_fisher_batches must be None or an integer >= 1, got {self.max_fisher_batches!r}.")
        if self.fisher_floor < 0:
            raise ValueError(f"fisher_floor must be >= 0, got {self.fisher_floor}.")
