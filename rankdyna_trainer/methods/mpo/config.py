from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...budget import check_budget_fraction


@dataclass
class MPOConfig:
    """Matrix product operator (MPO) compression (Gao et al., 2020; Liu et al., 2021).

    Each targeted ``out x in`` weight is reshaped into ``num_tensors`` pairs of factor indices and split by
    sequential SVDs into a chain of local tensors; the middle one is the central tensor that holds most
    parameters, the others are auxiliary. Bond dimensions are capped so that the chain meets the budget.
    """

    target_budget: float = field(
        default=0.5,
        metadata={"help": "Parameters kept, as a fraction of the dense parameters of the targeted matrices, "
                  "in (0, 1]."},
    )
    num_tensors: int = field(
        default=3, metadata={"help": "Local tensors per matrix (odd, >= 3, so there is one central tensor)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-name regex; None: the linear layers of the "
                  "repeated blocks."},
    )
    train_central: bool = field(
        default=False,
        metadata={"help": "Also fine-tune the central tensors. False (the MPO recipe) trains only the auxiliary "
                  "tensors, a small fraction of the parameters."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        if not isinstance(self.num_tensors, int) or self.num_tensors < 3 or self.num_tensors % 2 == 0:
            raise ValueError(f"num_tensors must be an odd integer >= 3 (one central tensor), got {self.num_tensors!r}.")

    def to_dict(self) -> dict:
        return asdict(self)
