from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfigMixin

from ...budget import check_budget_fraction, check_rank_multiple
from ...targets import has_table_roles, table_roles
from .defaults import AUTO
from .importance import IMPORTANCE_SCORES, SINGULAR_VALUE_SIGNALS
from .layer import FACTOR_SCALINGS

RANK_ORDERS = ("score", "score_per_param")
MASKED_GROUP_SCORINGS = ("every_step", "reallocation")

INITS = (AUTO, "svd", "whitened")
FFN_GROUPS = (AUTO, "singular", "channels")
ATTENTION_GROUPS = (AUTO, "singular", "channels")
UNTRAINED_GROUPS = (AUTO, "frozen", "dropped")
FACTOR_SCALING_CHOICES = (AUTO, *FACTOR_SCALINGS)
RANK_ORDER_CHOICES = (AUTO, *RANK_ORDERS)


@dataclass
class RankDynaConfig(PeftConfigMixin):
    """Settings of a RankDyna run: what to factorize, the parameter budget and its schedule.

    Fields defaulting to ``'auto'`` take the best measured value for the model's kind (encoder or decoder, decided
    in ``prepare_model``) or the run's length (``reallocation_interval``, decided when training starts): see
    :mod:`rankdyna_trainer.methods.rankdyna.defaults` and docs/method.md#defaults. The config is not changed; the
    resolved copy is ``model.rankdyna_config`` (and the callback's ``config``), which has no ``'auto'`` left.

    Saved and loaded as JSON with ``save_pretrained``/``from_pretrained`` (peft's config mechanism).
    RankDyna is not registered as a peft tuner: it rewrites and trains the base weights, while a
    ``PeftModel`` freezes them and saves only adapter tensors, so peft's model wrapper does not fit.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module-name suffixes (list) or a full-name regex (str) of the nn.Linear / transformers Conv1D "
            "layers to factorize. None: every such layer inside the model's repeated blocks (attention and FFN "
            "projections; see rankdyna_trainer.targets)."
        },
    )
    target_budget: float = field(
        default=0.5,
        metadata={"help": "Final parameter budget as a fraction of the dense parameters of the targeted "
                  "matrices, in (0, 1]."},
    )
    initial_budget: float = field(
        default=1.0,
        metadata={"help": "Budget at the start of pruning (fraction, target_budget <= initial_budget <= 1). "
                  "1.0 keeps every matrix at full rank until pruning starts."},
    )
    init_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Keep only the top `init_rank` singular groups of each matrix at factorization time "
                  "(saves memory on large models). None keeps all min(m, n) groups."},
    )
    factor_budget: Optional[float] = field(
        default=1.0,
        metadata={"help": "Trainable factors of each matrix, as a fraction of its dense parameters: the leading "
                  "floor(factor_budget * m*n / (m+n)) singular groups train their U and V; the other groups start "
                  "exact but with frozen factors (their singular values and gates still train and are scored). "
                  "It bounds the gradient and optimizer memory: the default 1.0 keeps RankDyna's training memory "
                  "within 1.5x of dense fine-tuning (docs/MEMORY_LM.md). None trains every group's factors (a "
                  "square matrix's factors then hold twice its weights, each with gradient and Adam state)."},
    )
    untrained_groups: str = field(
        default=AUTO,
        metadata={"help": "The groups beyond factor_budget: 'frozen' (kept, factors frozen: an exact start) or "
                  "'dropped' at factorization time (a truncated start, less memory). 'auto' (default): 'frozen' on "
                  "encoders; on decoders 'frozen' above a target_budget of 0.5, 'dropped' at 0.5 and below "
                  "(docs/DECODER.md)."},
    )
    ffn_groups: str = field(
        default="auto",
        metadata={"help": "What RankDyna prunes in the FFNs: 'singular' (singular groups of each FFN matrix, like the "
                  "attention's) or 'channels' (the FFN's intermediate channels: structured pruning, as LoRAP does; a "
                  "channel costs the weights that write and read it, is scored by the Fisher of a per-channel gate "
                  "and competes for the same global budget as the attention's singular groups). With 'channels' "
                  "an FFN whose output layer is targeted is handled whole (its input layers are not factorized). "
                  "'auto' (default): 'channels' when importance='fisher' and the FFN roles are known (given, or the "
                  "model type is in rankdyna_trainer.targets.MODULE_ROLES), else 'singular' (measured on GLUE and "
                  "SmolLM2: docs/method.md#ffn-channels-as-groups)."},
    )
    attention_groups: str = field(
        default=AUTO,
        metadata={"help": "What RankDyna prunes in the attention: 'singular' (singular groups of each of query, key, "
                  "value and output, m+n weights each) or 'channels' (per-head inner dimensions shared by a pair of "
                  "matrices: each head's query/key and value/output are first rotated exactly so that their dims "
                  "come ordered by the singular values of W_q^T W_k and W_o W_v; a q/k channel gates one query dim "
                  "(it costs its query and key rows) and a v/o channel one value dim (its value row and output "
                  "column), 2 x hidden weights each, scored by the Fisher of its gate in the same list as every "
                  "other group). 'channels' needs importance='fisher' and BERT/RoBERTa-style self-attention "
                  "(separate query/key/value layers; no RoPE, no fused or grouped projections). 'auto' (default): "
                  "'channels' where they apply (importance='fisher', a BERT/RoBERTa model, all four layers of its "
                  "attentions targeted), else 'singular' (measured on GLUE: docs/method.md#attention-channels-as-"
                  "groups)."},
    )
    ffn_in_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "ffn_groups='channels': name suffixes of the FFN layers that write the channels (e.g. "
                  "['gate_proj', 'up_proj']). None, with ffn_out_modules None: the table "
                  "rankdyna_trainer.targets.MODULE_ROLES for the model's type."},
    )
    ffn_out_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "ffn_groups='channels': name suffixes of the FFN layers that read the channels (e.g. "
                  "['down_proj'])."},
    )
    init: str = field(
        default=AUTO,
        metadata={"help": "How the factors start: 'svd' (SVD of the weight) or 'whitened' (SVD of W S, S the "
                  "Cholesky-like factor of the second moment of the layer's calibration inputs, so the dropped "
                  "groups are the ones carrying the least output energy; needs calibration_batches in "
                  "prepare_model). 'auto' (default): 'svd' on encoders, 'whitened' on decoders ('svd' with a "
                  "warning when prepare_model gets no calibration_batches)."},
    )
    whitening_damping: float = field(
        default=1e-2,
        metadata={"help": "init='whitened': ridge added to the inputs' second moment, relative to its mean "
                  "diagonal (>= 0)."},
    )
    warmup_fraction: Union[float, str] = field(
        default=AUTO,
        metadata={"help": "Fraction of optimizer steps before pruning starts (scores accumulate). 'auto' (default): "
                  "0.3 on encoders (GLUE), 0.1 on decoders (SmolLM2)."},
    )
    final_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of optimizer steps at the end with the allocation frozen at the target budget."},
    )
    reallocation_interval: Union[int, str] = field(
        default=AUTO,
        metadata={"help": "Optimizer steps between two reallocations during the pruning phase. 'auto' (default): "
                  "clamp(pruning steps // 10, 1, 10), set when training starts (10 on the GLUE protocol, 2 on the "
                  "SmolLM2 benchmark's 30 steps)."},
    )
    masked_group_scoring: str = field(
        default="reallocation",
        metadata={"help": "When masked groups are scored during pruning. Training multiplies only the kept groups "
                  "(rankdyna.kept_compute), which leaves a masked group without the gate gradient that lets it come "
                  "back, so some steps run every group: 'reallocation' (default) on each reallocation step, "
                  "'every_step' on every step of the pruning phase (the scores of runs before the kept-groups path; "
                  "a pruning step then costs a full-rank step). Measured in docs/method.md."},
    )
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the sensitivity, in [0, 1)."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the uncertainty, in [0, 1)."})
    singular_value_signal: str = field(
        default="gate",
        metadata={"help": "Sensitivity term of a group's singular value: 'gate' uses dL/d(gate), which equals "
                  "s*dL/ds for kept groups and stays informative for masked ones (our default); "
                  "'singular_value' is AdaLoRA's s*dL/ds, zero once a group is masked."},
    )
    importance: str = field(
        default="fisher",
        metadata={"help": "Score of a singular group: 'sensitivity' is AdaLoRA's smoothed |w*g| times its uncertainty; "
                  "'fisher' is the smoothed squared gate gradient s^2*E[(dL/ds)^2], the expected loss increase of "
                  "removing the group (docs/method.md)."},
    )
    factor_scaling: str = field(
        default=AUTO,
        metadata={"help": "How far one optimizer step on U and V moves the weight: 'none' (plain factorized training, "
                  "up to several times a dense step), 'matrix' (one multiplier per matrix so a step moves W as far as "
                  "a dense step) or 'group' (the same, spread evenly over singular directions). 'auto' (default): "
                  "'group' on encoders, 'none' on decoders."},
    )
    rank_by: str = field(
        default=AUTO,
        metadata={"help": "Order in which groups claim the budget: 'score', or 'score_per_param' (score divided by the "
                  "group's m+n parameters, so a cheap group of a small matrix is not outbid by a big matrix's). "
                  "'auto' (default): 'score_per_param' on encoders, 'score' on decoders."},
    )
    min_rank: int = field(
        default=0,
        metadata={"help": "Groups every targeted matrix keeps whatever its scores (counted in the budget); 0 lets a "
                  "matrix be pruned to rank 0."},
    )
    rank_multiple: int = field(
        default=1,
        metadata={"help": "Keep ranks in multiples of this (>= 1; e.g. 8 for faster GEMMs on CPUs and tensor cores): "
                  "groups are allocated in blocks of this many, counted in the budget (budget.allocate_groups)."},
    )
    orth_reg_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the orthogonality regularizer ||U^T U - I|| + ||V V^T - I|| (0 disables it)."},
    )
    distillation_weight: float = field(
        default=0.0,
        metadata={"help": "Self-distillation, in [0, 1] (0 disables it): when pruning starts (end of the warm-up) the "
                  "model, then dense and tuned on the task, is kept as a frozen teacher, and from there on the loss is "
                  "(1 - w) * task loss + w * T^2 * KL(teacher || student) of the softmaxed logits at temperature T "
                  "(a regression head: the squared error to the teacher's output). Costs one dense model copy and one "
                  "forward per step (rankdyna.distillation, docs/method.md)."},
    )
    distillation_temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T of the distillation term (> 0; the term is scaled by T^2)."},
    )

    def __post_init__(self):
        check_budget_fraction(self.target_budget)
        if not self.target_budget <= self.initial_budget <= 1.0:
            raise ValueError(
                f"initial_budget must be in [target_budget, 1] = [{self.target_budget}, 1], got {self.initial_budget}."
            )
        _check_fraction("warmup_fraction", self.warmup_fraction, may_be_auto=True)
        _check_fraction("final_fraction", self.final_fraction)
        if self.warmup_fraction != AUTO and self.warmup_fraction + self.final_fraction >= 1.0:
            raise ValueError(
                f"warmup_fraction + final_fraction must be below 1 to leave steps to prune in, got "
                f"{self.warmup_fraction} + {self.final_fraction} = {self.warmup_fraction + self.final_fraction}."
            )
        if self.reallocation_interval != AUTO and (isinstance(self.reallocation_interval, bool)
                                                   or not isinstance(self.reallocation_interval, int)
                                                   or self.reallocation_interval < 1):
            raise ValueError(f"reallocation_interval must be an integer >= 1 or 'auto', "
                             f"got {self.reallocation_interval!r}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if self.init_rank is not None and (not isinstance(self.init_rank, int) or self.init_rank < 1):
            raise ValueError(f"init_rank must be None or an integer >= 1, got {self.init_rank!r}.")
        if self.factor_budget is not None and (isinstance(self.factor_budget, bool)
                                               or not isinstance(self.factor_budget, (int, float))
                                               or not self.factor_budget > 0):
            raise ValueError(f"factor_budget must be None or a number > 0, got {self.factor_budget!r}.")
        if self.untrained_groups == "dropped" and self.factor_budget is not None \
                and self.factor_budget < self.target_budget:
            raise ValueError(f"With untrained_groups='dropped', factor_budget must be >= target_budget "
                             f"({self.target_budget}; below it the target could not be reached), "
                             f"got {self.factor_budget!r}.")
        if self.untrained_groups not in UNTRAINED_GROUPS:
            raise ValueError(f"untrained_groups must be one of {UNTRAINED_GROUPS}, got {self.untrained_groups!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}.")
        if isinstance(self.whitening_damping, bool) or not isinstance(self.whitening_damping, (int, float)) \
                or not self.whitening_damping >= 0:
            raise ValueError(f"whitening_damping must be a number >= 0, got {self.whitening_damping!r}.")
        if self.ffn_groups not in FFN_GROUPS:
            raise ValueError(f"ffn_groups must be one of {FFN_GROUPS}, got {self.ffn_groups!r}.")
        if self.ffn_groups == "channels" and self.importance != "fisher":
            raise ValueError(f"ffn_groups='channels' needs importance='fisher' (a channel has no factors for the "
                             f"'sensitivity' score's element statistics), got importance={self.importance!r}.")
        if self.attention_groups not in ATTENTION_GROUPS:
            raise ValueError(f"attention_groups must be one of {ATTENTION_GROUPS} ('singular': singular groups of each "
                             f"attention matrix; 'channels': per-head q/k and v/o channels; 'auto': channels where "
                             f"they apply), got "
                             f"{self.attention_groups!r}.")
        if self.attention_groups == "channels" and self.importance != "fisher":
            raise ValueError(f"attention_groups='channels' needs importance='fisher' (a channel has no factors for the "
                             f"'sensitivity' score's element statistics), got importance={self.importance!r}; set "
                             f"importance='fisher' or attention_groups='singular'.")
        if (self.ffn_in_modules is None) != (self.ffn_out_modules is None):
            raise ValueError(f"Pass both ffn_in_modules and ffn_out_modules or neither (the table for the model's "
                             f"type), got ffn_in_modules={self.ffn_in_modules!r}, "
                             f"ffn_out_modules={self.ffn_out_modules!r}.")
        for name in ("ffn_in_modules", "ffn_out_modules"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty list of module-name suffixes, got {value!r}.")
        if self.singular_value_signal not in SINGULAR_VALUE_SIGNALS:
            raise ValueError(f"singular_value_signal must be one of {SINGULAR_VALUE_SIGNALS}, "
                             f"got {self.singular_value_signal!r}.")
        choices = {"importance": IMPORTANCE_SCORES, "factor_scaling": FACTOR_SCALING_CHOICES,
                   "rank_by": RANK_ORDER_CHOICES,
                   "masked_group_scoring": MASKED_GROUP_SCORINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ValueError(f"min_rank must be an integer >= 0, got {self.min_rank!r}.")
        check_rank_multiple(self.rank_multiple)
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        _check_distillation(self.distillation_weight, self.distillation_temperature)
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ValueError("target_modules is an empty list; pass None for the architecture's defaults.")

    def resolved_ffn_groups(self, model) -> str:
        """``'singular'`` or ``'channels'``: ``ffn_groups`` with ``'auto'`` decided for ``model``."""
        if self.ffn_groups != "auto":
            return self.ffn_groups
        if self.importance == "fisher" and (self.ffn_in_modules is not None or has_table_roles(model)):
            return "channels"
        return "singular"

    def ffn_roles(self, model) -> dict[str, list[str]]:
        """The FFN roles for ``ffn_groups='channels'``: the ones given, or the table entry for the model's type."""
        if self.ffn_in_modules is not None:
            return {"ffn_in_modules": list(self.ffn_in_modules), "ffn_out_modules": list(self.ffn_out_modules)}
        # Every role of the table, not only the FFN ones: BERT's FFN output suffix `output.dense` also matches the
        # attention output, which the V/O role claims first (targets.module_role).
        return table_roles(model, "RankDyna's ffn_groups='channels'", "ffn_in_modules and ffn_out_modules")

    def to_dict(self) -> dict:
        # Without a peft_type key, peft's loader instantiates the calling class instead of looking the type
        # up in its closed registry.
        config = super().to_dict()
        config.pop("peft_type", None)
        return config


def _check_distillation(weight, temperature) -> None:
    def is_number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float))

    if not is_number(weight) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation_weight must be a number in [0, 1] (0 disables distillation), got {weight!r}.")
    if not is_number(temperature) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"distillation_temperature must be a finite number > 0, got {temperature!r}.")


def _check_fraction(name: str, value, may_be_auto: bool = False) -> None:
    if may_be_auto and value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        allowed = "in [0, 1) or 'auto'" if may_be_auto else "in [0, 1)"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
