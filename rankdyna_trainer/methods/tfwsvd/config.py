from __future__ import annotations

from dataclasses import dataclass, field

from ..fwsvd.config import FWSVDConfig


@dataclass
class TFWSVDConfig(FWSVDConfig):
    """Element-wise Fisher-weighted low-rank approximation (TFWSVD, Hua et al. 2022), solved by alternating
    weighted least squares from the FWSVD solution, at the same ranks as FWSVD."""

    als_iterations: int = field(
        default=5, metadata={"help": "Alternating weighted least-squares sweeps (each solves both factors); >= 1."}
    )
    ridge: float = field(
        default=1e-6,
        metadata={"help": "Tikhonov term of each small least-squares system, relative to its mean diagonal; >= 0. "
                  "Keeps systems whose weights are nearly zero solvable."},
    )
    row_chunk: int = field(
        default=256, metadata={"help": "Rows (or columns) solved together; bounds memory to chunk x rank x width."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.als_iterations, int) or self.als_iterations < 1:
            raise ValueError(f"als_iterations must be an integer >= 1, got {self.als_iterations!r}.")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}.")
        if not isinstance(self.row_chunk, int) or self.row_chunk < 1:
            raise ValueError(f"row_chunk must be an integer >= 1, got {self.row_chunk!r}.")
