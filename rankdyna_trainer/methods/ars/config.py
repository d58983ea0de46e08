from __future__ import annotations

from dataclasses import dataclass, field

from ..fwsvd.config import FWSVDConfig

FACTORIZATIONS = ("fwsvd", "svd")


@dataclass
class ARSConfig(FWSVDConfig):
    """Adaptive Rank Selection (Gao et al., NAACL 2024): binary masks over the singular groups of a frozen,
    fine-tuned model, drawn from a small hypernetwork, then projected onto the parameter budget."""

    factorization: str = field(
        default="fwsvd", metadata={"help": f"Decomposition whose groups are masked: one of {FACTORIZATIONS}."}
    )
    mask_steps: int = field(default=100, metadata={"help": "Optimizer steps of hypernetwork training; >= 1."})
    mask_learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the hypernetwork; > 0."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the hypernetwork's GRU; >= 1."})
    temperature: float = field(default=0.4, metadata={"help": "Gumbel-sigmoid temperature; > 0."})
    alignment_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the alignment regularizer that keeps kept groups at the top of each "
                  "spectrum (penalises a group more likely kept than the larger one before it); >= 0."},
    )
    budget_weight: float = field(
        default=2.0,
        metadata={"help": "Weight of the penalty (kept params / budget - 1)^2 on the sampled masks; >= 0."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}.")
        if not isinstance(self.mask_steps, int) or self.mask_steps < 1:
            raise ValueError(f"mask_steps must be an integer >= 1, got {self.mask_steps!r}.")
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"hidden_size must be an integer >= 1, got {self.hidden_size!r}.")
        for name in ("mask_learning_rate", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("alignment_weight", "budget_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
