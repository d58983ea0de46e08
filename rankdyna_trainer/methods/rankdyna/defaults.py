"""RankDynaConfig's ``'auto'`` defaults: the best measured recipe for the model's kind and the run's length.

Two recipes were measured (docs/method.md#defaults): the GLUE campaign's on MiniLM (encoder classifiers, hundreds of
optimizer steps) and the SmolLM2 benchmark's (a causal LM, a 30-step fine-tune; docs/DECODER.md). A field left at
``'auto'`` takes the value of the recipe for the model's kind (resolved in ``prepare_model``) or for the run's length
(``reallocation_interval``, resolved when training starts, once ``max_steps`` is known). Explicit values always win.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from ...targets import unwrap_model

logger = logging.getLogger(__name__)

AUTO = "auto"
ENCODER, DECODER = "encoder", "decoder"

# Fields whose 'auto' is decided by the model's kind, in the order the log line lists them.
MODEL_KIND_FIELDS = ("init", "factor_scaling", "rank_by", "untrained_groups", "warmup_fraction")
# Above this budget the decoder recipe keeps the exact start (untrained groups frozen), at or below it the start is
# truncated at break-even (docs/DECODER.md: 92.9 vs 119.4 at 0.8, 250 vs 297 at 0.5, seed 0).
DECODER_EXACT_START_ABOVE = 0.5
# reallocation_interval='auto': one reallocation per tenth of the pruning phase, at most every 10 steps (the GLUE
# campaign's interval) and at least every step (the SmolLM2 benchmark's 21 pruning steps give its interval, 2).
REALLOCATIONS_PER_PHASE = 10
MAX_REALLOCATION_INTERVAL = 10


def model_kind(model: nn.Module) -> str:
    """``'decoder'`` for a causal language model: one that generates (``model.can_generate()``: a ``...ForCausalLM`` /
    ``LMHeadModel`` head) and is not encoder-decoder. ``'encoder'`` for everything else: classifiers of any
    architecture (a ``LlamaForSequenceClassification`` too: it is fine-tuned like the GLUE campaign), encoder-decoders
    (neither recipe was measured on them; the encoder one needs no calibration data) and vision models."""
    model = unwrap_model(model)
    can_generate = getattr(model, "can_generate", None)
    generates = callable(can_generate) and bool(can_generate())
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return DECODER if generates and not encoder_decoder else ENCODER


def kind_defaults(kind: str, target_budget: float, factor_budget: float | None = 1.0) -> dict:
    """The measured recipe of ``kind`` for the fields in MODEL_KIND_FIELDS."""
    if kind == DECODER:  # scripts/benchmark_lm.py's `rankdyna` row, docs/DECODER.md
        # A factor_budget below the target cannot reach it from a truncated start: the exact start then.
        truncatable = factor_budget is None or factor_budget >= target_budget
        exact = target_budget > DECODER_EXACT_START_ABOVE or not truncatable
        return {"init": "whitened", "factor_scaling": "none", "rank_by": "score",
                "untrained_groups": "frozen" if exact else "dropped", "warmup_fraction": 0.1}
    # The GLUE campaign (issue 9's fixes), with issue 28's warm-up 0.3 (docs/method.md, schedule control).
    return {"init": "svd", "factor_scaling": "group", "rank_by": "score_per_param", "untrained_groups": "frozen",
            "warmup_fraction": 0.3}


def reallocation_interval_for(pruning_steps: int) -> int:
    """``reallocation_interval='auto'``: ``clamp(pruning_steps // 10, 1, 10)``."""
    return min(MAX_REALLOCATION_INTERVAL, max(1, pruning_steps // REALLOCATIONS_PER_PHASE))


def needs_calibration(config, model: nn.Module) -> bool:
    """Whether ``prepare_model(model, config, ...)`` would start from the whitened SVD, i.e. wants calibration
    batches (``init='whitened'``, or ``'auto'`` on a decoder)."""
    if config.init == AUTO:
        return kind_defaults(model_kind(model), config.target_budget, config.factor_budget)["init"] == "whitened"
    return config.init == "whitened"


def auto_fields(config, names=MODEL_KIND_FIELDS) -> list[str]:
    return [name for name in names if getattr(config, name) == AUTO]


def resolve_model_kind(config, model: nn.Module, has_calibration: bool):
    """``config`` with its model-kind ``'auto'`` fields set for ``model`` (a copy; ``config`` is not changed), and the
    resolved values as ``{field: value}``. A decoder's whitened start falls back to the plain SVD, with a warning,
    when there is no calibration data."""
    return resolve_for_kind(config, model_kind(model), has_calibration)


def resolve_for_kind(config, kind: str, has_calibration: bool = True):
    """:func:`resolve_model_kind` for a model of ``kind`` (``'encoder'`` or ``'decoder'``)."""
    names = auto_fields(config)
    if not names:
        return config, {}
    recipe = kind_defaults(kind, config.target_budget, config.factor_budget)
    resolved = {name: recipe[name] for name in names}
    if resolved.get("init") == "whitened" and not has_calibration:
        logger.warning(
            "RankDyna defaults for %s %s start from the whitened SVD (init='whitened', the measured decoder recipe: "
            "docs/DECODER.md), which needs calibration data, and prepare_model got no calibration_batches: this run "
            "starts from the plain SVD (init='svd') instead. Pass a few batches of training text, e.g. "
            "prepare_model(model, config, calibration_batches=[{'input_ids': ids[i:i + 4]} for i in range(0, 32, "
            "4)]), or set RankDynaConfig(init='svd') to choose the plain start.", article(kind), kind)
        resolved["init"] = "svd"
    return with_values(config, resolved, f"RankDyna defaults for {article(kind)} {kind}"), resolved


def with_values(config, values: dict, what: str):
    """``config`` with ``values`` set (validated again); an error names where the values came from."""
    try:
        return dataclasses.replace(config, **values)
    except ValueError as error:
        given = ", ".join(f"{name}='auto' -> {value!r}" for name, value in values.items())
        raise ValueError(f"{what} ({given}) do not fit the values given: {error} Set these fields explicitly."
                         ) from error


def article(kind: str) -> str:
    return "an" if kind == ENCODER else "a"


def describe(resolved: dict, notes: dict | None = None) -> str:
    """``name=value`` pairs for the log line, each with its note (why that value) where there is one."""
    notes = notes or {}
    return ", ".join(f"{name}={value}" + (f" ({notes[name]})" if name in notes else "")
                     for name, value in resolved.items())
