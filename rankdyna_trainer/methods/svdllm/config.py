from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..svd.config import SVDConfig

ALLOCATIONS = ("uniform", "global")


@dataclass
class SVDLLMConfig(SVDConfig):
    """Whitened truncated SVD (SVD-LLM's truncation-aware data whitening) under one parameter budget.

    Each matrix is factorized as ``SVD(W S) S^-1`` with ``S S^T`` the second moment of its calibration inputs,
    so dropping a singular value costs exactly its square in output error on those inputs.
    """

    allocation: str = field(
        default="uniform",
        metadata={"help": "'uniform': every matrix keeps target_budget of its own weights (SVD-LLM's setting, as "
                  "the activation-weighted SVD baseline); 'global': one allocation over all matrices, keeping "
                  "the groups that carry the largest fraction of their matrix's output energy per parameter."},
    )
    damping: float = field(
        default=1e-2,
        metadata={"help": "Ridge added to the inputs' second moment before whitening, relative to its mean "
                  "diagonal (>= 0); keeps the whitening invertible when the second moment is singular."},
    )
    max_calibration_batches: Optional[int] = field(
        default=None,
        metadata={"help": "Batches of the calibration data to use (None: all of them)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping >= 0:
            raise ValueError(f"damping must be a number >= 0, got {self.damping!r}.")
        if self.max_calibration_batches is not None and (not isinstance(self.max_calibration_batches, int)
                                                         or self.max_calibration_batches < 1):
            raise ValueError(f"max_calibration_batches must be None or an integer >= 1, "
                             f"got {self.max_calibration_batches!r}.")
