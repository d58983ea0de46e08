#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task, optionally compressing it with RankDyna in the same run.

    python scripts/run_glue.py --model_name_or_path minilm --task_name rte --glue_dir ../shared/data/glue \
        --rankdyna --rankdyna_budget 0.5 --do_train --do_eval --output_dir outputs/rte-rankdyna

Arguments follow transformers' text-classification example (every ``TrainingArguments`` option works), plus a
RankDyna group (``--rankdyna`` switches it on) and ``--hyperparameter_search N`` (optuna over the space of
``scripts/sweep_rankdyna.yaml``, each trial one W&B run). ``python scripts/run_glue.py --help`` lists them all.

With ``--rankdyna`` the run trains the factorized model under the shrinking budget, exports the kept ranks as
small ``Linear(n, r) -> Linear(r, m)`` pairs, saves that compressed model with ``save_pretrained`` (after
``import rankdyna_trainer``, ``AutoModelForSequenceClassification.from_pretrained`` reloads it), draws the final
allocation (``rank_heatmap.png``) and evaluates the reloaded compressed model. Evaluation metrics go to
``<output_dir>/eval_results.json``.

A mistake on the command line (an unknown choice, a value out of range, a missing data file) prints one line
naming the flag and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, however it is installed

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from rankdyna_trainer import (  # noqa: E402
    RankDynaCallback,
    RankDynaConfig,
    export_model,
    prepare_model,
    rank_pattern,
    save_compressed_model,
)
from rankdyna_trainer.calibration import first_batches  # noqa: E402
from rankdyna_trainer.deploy import write_model_card  # noqa: E402
from rankdyna_trainer.experiment.glue_data import GLUE_TASKS, get_task, load_glue, load_glue_files  # noqa: E402
from rankdyna_trainer.experiment.glue_metrics import (  # noqa: E402
    constant_prediction_floor,
    load_glue_metric,
    main_metric,
    prediction_spread,
)
from rankdyna_trainer.experiment.rank_plots import save_rank_heatmap  # noqa: E402
from rankdyna_trainer.experiment.sweep import optuna_space, read_sweep_config  # noqa: E402
from rankdyna_trainer.experiment.wandb_logging import (  # noqa: E402
    RankDynaWandbCallback,
    active_wandb_run,
    full_ranks,
    log_exported_model,
)
from rankdyna_trainer.methods import METHODS, get_method  # noqa: E402
from rankdyna_trainer.methods.rankdyna.defaults import needs_calibration  # noqa: E402
from rankdyna_trainer.packaged_models import minilm_path  # noqa: E402
from rankdyna_trainer.quantizer import is_compressed_model_dir, read_compression_config  # noqa: E402
from rankdyna_trainer.targets import TARGET_TYPES, linear_shape  # noqa: E402

logger = logging.getLogger("run_glue")

MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path}  # short names for packaged models
DEFAULT_SWEEP_CONFIG = str(Path(__file__).resolve().parent / "sweep_rankdyna.yaml")
HEATMAP_FILE = "rank_heatmap.png"
SUMMARY_FILE = "run_summary.json"
_RANKDYNA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RankDynaConfig)}


class UsageError(ValueError):
    """A command-line mistake: ``python scripts/run_glue.py`` prints it as one line naming the flag and exits with
    code 2, without a traceback."""


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None``: those options' help says what leaving them unset means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class _OneLineErrorParser(HfArgumentParser):
    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, formatter_class=_DefaultsHelpFormatter)

    def error(self, message: str):
        # argparse prints its whole usage block before the error; one line naming the flag is easier to read.
        raise UsageError(message)


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Model folder or hub id; 'minilm' is the packaged all-MiniLM-L6-v2. A folder written by "
                  "a compressing run loads as the compressed model."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    compression_method: str = field(
        default="dense",
        metadata={"choices": sorted(METHODS),
                  "help": "Compression method (rankdyna_trainer.methods). 'dense' fine-tunes without compressing; "
                  "'rankdyna' is --rankdyna; 'mpo' trains matrix product operators' auxiliary tensors; 'svd', "
                  "'fwsvd', 'tfwsvd', 'ars', 'svdllm' compress --model_name_or_path, which should already be "
                  "fine-tuned on the task, then fine-tune the factorized model (their second round); 'lorap' "
                  "compresses with calibration batches, then fine-tunes; 'adalora' trains peft AdaLoRA adapters "
                  "and exports the merged dense model."},
    )
    compression_budget: float = field(
        default=0.5, metadata={"help": "Parameter budget of --compression_method (fraction of the targeted weights)."}
    )
    compression_fisher_batches: Optional[int] = field(
        default=None,
        metadata={"help": "Training batches for the Fisher information of fwsvd/tfwsvd/ars (default: all of them)."}
    )
    compression_calibration_batches: int = field(
        default=16,
        metadata={"help": "Training batches used as calibration inputs by lorap, svdllm and RankDyna's whitened "
                  "start (--rankdyna_init whitened)."},
    )
    compression_rank_multiple: int = field(
        default=1,
        metadata={"help": "Keep ranks in multiples of this (rankdyna, svd, fwsvd, tfwsvd, ars; e.g. 8 for faster "
                  "GEMMs), counted in the budget. 1: any rank."}
    )


@dataclass
class DataTrainingArguments:
    task_name: str = field(default=None, metadata={"help": f"GLUE task: one of {sorted(GLUE_TASKS)}."})
    glue_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Local GLUE folder in the standard layout (<TASK>/train.tsv, dev.tsv). Defaults to "
                  "$GLUE_DIR; with neither, the task is loaded from the Hugging Face hub (nyu-mll/glue)."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Train TSV in the task's GLUE format."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Dev TSV in the task's GLUE format."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (tokens)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep the first N rows of each dev set."})


@dataclass
class RankDynaArguments:
    """``--rankdyna`` plus the RankDynaConfig options, with RankDynaConfig's defaults."""

    rankdyna: bool = field(default=False, metadata={"help": "Compress with RankDyna while fine-tuning."})
    rankdyna_budget: float = field(
        default=_RANKDYNA_DEFAULTS["target_budget"],
        metadata={"help": "Final parameter budget, fraction of the targeted matrices' dense weights, in (0, 1]."})
    rankdyna_initial_budget: float = field(
        default=_RANKDYNA_DEFAULTS["initial_budget"], metadata={"help": "Budget when pruning starts."})
    # 'auto' or a number: typed str so that argparse takes both (to_config converts the number).
    rankdyna_warmup_fraction: str = field(
        default=_RANKDYNA_DEFAULTS["warmup_fraction"],
        metadata={"help": "Fraction of steps before pruning starts, or 'auto' (0.3 on encoders, 0.1 on decoders)."})
    rankdyna_final_fraction: float = field(
        default=_RANKDYNA_DEFAULTS["final_fraction"],
        metadata={"help": "Fraction of steps at the end with the allocation frozen."})
    rankdyna_reallocation_interval: str = field(
        default=_RANKDYNA_DEFAULTS["reallocation_interval"],
        metadata={"help": "Optimizer steps between reallocations, or 'auto' (clamp(pruning steps // 10, 1, 10))."})
    rankdyna_beta1: float = field(
        default=_RANKDYNA_DEFAULTS["beta1"], metadata={"help": "EMA coefficient of the sensitivity."})
    rankdyna_beta2: float = field(
        default=_RANKDYNA_DEFAULTS["beta2"], metadata={"help": "EMA coefficient of the uncertainty."})
    rankdyna_singular_value_signal: str = field(
        default=_RANKDYNA_DEFAULTS["singular_value_signal"],
        metadata={"choices": ["gate", "singular_value"],
                  "help": "'gate' or 'singular_value' (AdaLoRA's s*dL/ds); see docs/method.md."})
    rankdyna_importance: str = field(
        default=_RANKDYNA_DEFAULTS["importance"],
        metadata={"choices": ["sensitivity", "fisher"],
                  "help": "Group score: 'fisher' (s^2 E[(dL/ds)^2]) or 'sensitivity' (AdaLoRA's); docs/method.md."})
    rankdyna_factor_scaling: str = field(
        default=_RANKDYNA_DEFAULTS["factor_scaling"], metadata={"choices": ["auto", "none", "matrix", "group"],
                                                               "help": "Step size of the factors ('auto': 'group' "
                                                               "on encoders, 'none' on decoders; docs/method.md)."})
    rankdyna_rank_by: str = field(
        default=_RANKDYNA_DEFAULTS["rank_by"], metadata={"choices": ["auto", "score", "score_per_param"],
                                                        "help": "'score_per_param' divides by the group's m+n ("
                                                        "'auto': per parameter on encoders, 'score' on decoders)."})
    rankdyna_min_rank: int = field(
        default=_RANKDYNA_DEFAULTS["min_rank"],
        metadata={"help": "Groups every targeted matrix keeps (0: a matrix may reach rank 0)."})
    rankdyna_rank_multiple: int = field(
        default=_RANKDYNA_DEFAULTS["rank_multiple"],
        metadata={"help": "Keep ranks in multiples of this (e.g. 8 for faster GEMMs), counted in the budget."})
    rankdyna_orth_reg_weight: float = field(
        default=_RANKDYNA_DEFAULTS["orth_reg_weight"],
        metadata={"help": "Weight of the orthogonality regularizer (0 disables it)."})
    rankdyna_init_rank: Optional[int] = field(
        default=None, metadata={"help": "Keep the top-k groups at SVD time (default: all min(m, n) groups)."})
    rankdyna_factor_budget: Optional[float] = field(
        default=_RANKDYNA_DEFAULTS["factor_budget"],
        metadata={"help": "Trainable factors per matrix, fraction of its dense weights; the other groups' factors "
                  "are frozen (2 or more: every group trains; see docs/method.md)."})
    rankdyna_untrained_groups: str = field(
        default=_RANKDYNA_DEFAULTS["untrained_groups"],
        metadata={"choices": ["auto", "frozen", "dropped"],
                  "help": "Groups beyond --rankdyna_factor_budget: kept with frozen factors, or dropped at the start "
                  "('auto': frozen on encoders; on decoders frozen above a budget of 0.5, dropped at or below)."})
    rankdyna_ffn_groups: str = field(
        default=_RANKDYNA_DEFAULTS["ffn_groups"],
        metadata={"choices": ["auto", "singular", "channels"],
                  "help": "What is pruned in the FFNs: singular groups of each matrix, or intermediate channels "
                  "(structured, in the same budget); 'auto': channels where the model type's FFN roles are known "
                  "and the importance is 'fisher' (docs/method.md)."})
    rankdyna_attention_groups: str = field(
        default=_RANKDYNA_DEFAULTS["attention_groups"],
        metadata={"choices": ["auto", "singular", "channels"],
                  "help": "What is pruned in the attention: singular groups of each matrix, or per-head q/k and v/o "
                  "channels after an exact rotation of each head (BERT/RoBERTa only, in the same budget); 'auto': "
                  "channels where they apply, else singular (docs/method.md#attention-channels-as-groups)."})
    rankdyna_init: str = field(
        default=_RANKDYNA_DEFAULTS["init"],
        metadata={"choices": ["auto", "svd", "whitened"],
                  "help": "'svd' or 'whitened' (calibrated on --compression_calibration_batches training batches); "
                  "'auto': 'svd' on encoders, 'whitened' on decoders."})
    rankdyna_whitening_damping: float = field(
        default=_RANKDYNA_DEFAULTS["whitening_damping"],
        metadata={"help": "Ridge of the whitened start, relative to the inputs' mean square."})
    rankdyna_target_modules: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated module-name suffixes to factorize (default: every linear layer of the "
                  "model's repeated blocks)."})
    rankdyna_distillation_weight: float = field(
        default=_RANKDYNA_DEFAULTS["distillation_weight"],
        metadata={"help": "Self-distillation weight in [0, 1] (0: off): the model when pruning starts is the "
                  "teacher of the rest of the run (docs/method.md#self-distillation)."})
    rankdyna_distillation_temperature: float = field(
        default=_RANKDYNA_DEFAULTS["distillation_temperature"],
        metadata={"help": "Softmax temperature of the distillation term (> 0)."})

    def given_options(self) -> dict:
        """The options set to something other than their default (what would change the run)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "rankdyna" and getattr(self, f.name) != f.default}

    def to_config(self, overrides: dict | None = None) -> RankDynaConfig:
        """The RankDynaConfig of these options (``overrides``: a search trial's values by argument name)."""
        options = {**self.given_options(), **(overrides or {})}
        if "rankdyna_target_modules" in options:
            options["rankdyna_target_modules"] = [t.strip() for t in options["rankdyna_target_modules"].split(",")]
        for name, number in _NUMBER_OR_AUTO.items():
            if name in options:
                options[name] = _number_or_auto(name, options[name], number)
        try:
            return RankDynaConfig(**{_config_field(k): v for k, v in options.items()})
        except ValueError as err:  # the config names its fields; the user typed flags
            raise UsageError(_fields_as_flags(str(err))) from err


_NUMBER_OR_AUTO = {"rankdyna_warmup_fraction": float, "rankdyna_reallocation_interval": int}


def _number_or_auto(argument: str, value, number: type):
    """A flag that takes a number or 'auto', as given on the command line (a string) or by a search trial."""
    if not isinstance(value, str) or value == "auto":
        return value
    try:
        return number(value)
    except ValueError:
        kind = "an integer" if number is int else "a number"
        raise UsageError(f"--{argument} takes {kind} or 'auto', got {value!r}.") from None


def _config_field(argument: str) -> str:
    return "target_budget" if argument == "rankdyna_budget" else argument.removeprefix("rankdyna_")


def _fields_as_flags(message: str) -> str:
    """RankDynaConfig's message with each field name replaced by the run_glue.py flag that sets it."""
    flags = {_config_field(f.name): f"--{f.name}" for f in dataclasses.fields(RankDynaArguments)
             if f.name != "rankdyna"}
    return re.sub(r"\b(" + "|".join(sorted(flags, key=len, reverse=True)) + r")\b", lambda m: flags[m.group(1)],
                  message)


@dataclass
class SearchArguments:
    hyperparameter_search: int = field(
        default=0, metadata={"help": "Run N optuna trials (Trainer.hyperparameter_search) instead of one run."})
    sweep_config: str = field(
        default=DEFAULT_SWEEP_CONFIG, metadata={"help": "W&B sweep YAML whose 'parameters' are the search space."})


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, RankDynaArguments, SearchArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    parser = _OneLineErrorParser(ARGUMENT_CLASSES)
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported_as(None, ValueError):  # TrainingArguments checks its own combinations; its messages name flags
        if len(argv) == 1 and argv[0].endswith(".json"):
            args = parser.parse_json_file(os.path.abspath(argv[0]))
        else:
            args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(*args)
    return args


def check_arguments(model_args, data_args, rankdyna_args, search_args, training_args) -> None:
    """Fail before loading anything when the arguments cannot make a run."""
    if data_args.task_name is None:
        raise UsageError(f"--task_name is required: one of {sorted(GLUE_TASKS)}.")
    with reported_as("--task_name", ValueError):
        get_task(data_args.task_name)  # unknown task -> ValueError naming the choices
    if model_args.compression_calibration_batches < 1:
        raise UsageError(f"--compression_calibration_batches must be >= 1, "
                         f"got {model_args.compression_calibration_batches}.")
    method = model_args.compression_method
    with reported_as("--compression_method", ValueError):
        get_method(method)  # argparse checks the choices; this covers callers that build the arguments in code
    if rankdyna_args.rankdyna and method not in ("dense", "rankdyna"):
        raise UsageError(f"--rankdyna and --compression_method {method} pick two methods; keep one.")
    if method == "rankdyna":
        rankdyna_args.rankdyna = True
        if rankdyna_args.rankdyna_budget == _RANKDYNA_DEFAULTS["target_budget"]:
            rankdyna_args.rankdyna_budget = model_args.compression_budget
        if rankdyna_args.rankdyna_rank_multiple == _RANKDYNA_DEFAULTS["rank_multiple"]:
            rankdyna_args.rankdyna_rank_multiple = model_args.compression_rank_multiple
    elif method != "dense" and not training_args.do_train:
        raise UsageError(f"--compression_method {method} trains (fine-tuning after compression, or adapters): "
                         "add --do_train.")
    elif method != "dense" and search_args.hyperparameter_search:
        raise UsageError(f"--hyperparameter_search supports --compression_method rankdyna or dense, not {method}.")
    config_class = get_method(method).config_class
    takes_multiple = config_class is not None and "rank_multiple" in {f.name for f in dataclasses.fields(config_class)}
    if model_args.compression_rank_multiple != 1 and not takes_multiple:
        raise UsageError(f"--compression_rank_multiple applies to rankdyna, svd, fwsvd, tfwsvd and ars, not to "
                         f"--compression_method {method}; drop it.")
    if method != "rankdyna" and config_class is not None:
        extra = {"rank_multiple": model_args.compression_rank_multiple} if takes_multiple else {}
        try:  # the method's config checks the budget before any model is loaded
            config_class(target_budget=model_args.compression_budget, **extra)
        except ValueError as err:
            message = str(err).replace("target_budget", "--compression_budget")
            raise UsageError(message.replace("rank_multiple", "--compression_rank_multiple")) from err
    given = rankdyna_args.given_options()
    if given and not rankdyna_args.rankdyna:
        flags = ", ".join(f"--{name}" for name in given)
        raise UsageError(f"{flags} only take effect with --rankdyna; add --rankdyna to compress, or drop them.")
    if rankdyna_args.rankdyna:
        rankdyna_args.to_config()  # RankDynaConfig validates every value
        if not (training_args.do_train or search_args.hyperparameter_search):
            raise UsageError("--rankdyna compresses while training: add --do_train. To evaluate a compressed model, "
                             "pass its folder as --model_name_or_path without --rankdyna.")
    if not (training_args.do_train or training_args.do_eval or search_args.hyperparameter_search):
        raise UsageError("Nothing to do: pass --do_train and/or --do_eval (or --hyperparameter_search N).")
    if search_args.hyperparameter_search < 0:
        raise UsageError(f"--hyperparameter_search takes a number of trials >= 0, "
                         f"got {search_args.hyperparameter_search}.")


@contextlib.contextmanager
def reported_as(flag: str | None, *errors: type[Exception]):
    """Turn ``errors`` raised inside into a :class:`UsageError` that starts with ``flag``."""
    try:
        yield
    except UsageError:
        raise
    except errors as err:
        message = " ".join(str(err).split())
        raise UsageError(f"{flag}: {message}" if flag else message) from err


def data_source_flag(data_args) -> str:
    """The flag that chose where GLUE data is read from, for error messages."""
    if data_args.train_file or data_args.validation_file:
        return "--train_file/--validation_file"
    if data_args.glue_dir or os.environ.get("GLUE_DIR"):
        return "--glue_dir" if data_args.glue_dir else "$GLUE_DIR"
    return "--glue_dir (not given, so the hub was asked)"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def load_raw_datasets(data_args, training_args, need_train: bool):
    task = get_task(data_args.task_name)
    if data_args.train_file or data_args.validation_file:
        raw = load_glue_files(task, data_args.train_file, data_args.validation_file)
    else:
        try:
            raw = load_glue(task, data_args.glue_dir)
        except ConnectionError as err:  # no local folder given, and the hub is out of reach
            raise ConnectionError(f"{err}. Without a network, point --glue_dir (or $GLUE_DIR) at a local GLUE "
                                  "folder.") from err
    validation_splits = [s for s in raw if s.startswith("validation")]
    if need_train and "train" not in raw:
        raise ValueError("Training needs a train split: give --train_file or a GLUE folder.")
    if training_args.do_eval and not validation_splits:
        raise ValueError("--do_eval needs a dev split: give --validation_file or a GLUE folder.")
    limits = {"train": data_args.max_train_samples, **{s: data_args.max_eval_samples for s in validation_splits}}
    for split, limit in limits.items():
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def tokenize(raw, tokenizer, task, max_seq_length: int):
    def encode(batch):
        texts = [batch[column] for column in task.text_columns]
        return tokenizer(*texts, truncation=True, max_length=max_seq_length)

    # Padding happens per batch (Trainer's default DataCollatorWithPadding), which is faster than max_length.
    return raw.map(encode, batched=True, remove_columns=list(task.text_columns), desc="Tokenizing")


def compute_metrics_for(task_name: str):
    task = get_task(task_name)
    metric = load_glue_metric(task.name)

    def compute_metrics(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predictions, references=eval_pred.label_ids)

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------
# Model and compression method
# --------------------------------------------------------------------------------------------------------------
def resolve_model_path(name: str) -> str:
    return MODEL_ALIASES[name]() if name in MODEL_ALIASES else name


def load_model(model_path: str, task):
    if is_compressed_model_dir(model_path):  # transformers rebuilds it through rankdyna_trainer's quantizer
        return AutoModelForSequenceClassification.from_pretrained(model_path)
    labels = task.label_names or ("score",)
    return AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
        problem_type="regression" if task.is_regression else "single_label_classification",
    )


@dataclass
class Compression:
    """What a compression method contributes to the run: a model transform before training (given a search
    trial's values by argument name), Trainer callbacks, and the export after training."""

    method: str
    prepare: Callable[[object, dict], object]
    callbacks: list[TrainerCallback]
    # model -> (exported model, module layout, method config, ranks)
    export: Callable[[object], tuple[object, dict, dict, dict[str, int]]]
    search_arguments: tuple[str, ...]  # argument names a search trial may set for this method
    train_loader: object = None  # labelled task batches, for methods that read the data when compressing
    total_steps: int | None = None  # optimizer steps of the run, for methods that schedule over them
    # (out, in) of every linear layer before compression: LoRAP's pruned FFN layers change shape
    dense_shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # groups of each ranked layer when nothing is pruned, where that is not min(out, in) of its dense shape
    # (RankDyna's FFN channel groups: the intermediate width); set by export
    full_ranks: dict[str, int] = dataclasses.field(default_factory=dict)


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer, taken before compression changes them."""
    return {name: linear_shape(m) for name, m in model.named_modules() if isinstance(m, TARGET_TYPES)}


def rankdyna_compression(rankdyna_args: RankDynaArguments, model_args: ModelArguments | None = None) -> Compression:
    callback = RankDynaCallback()
    calibration_count = model_args.compression_calibration_batches if model_args is not None else 16

    def prepare(model, overrides):
        compression.dense_shapes = linear_shapes(model)  # FFN channel groups narrow the FFN's layers at export
        config = rankdyna_args.to_config(overrides)
        callback.config = config  # a search trial's config replaces the previous trial's
        calibration = (first_batches(compression.train_loader, calibration_count, "--rankdyna_init whitened")
                       if needs_calibration(config, model) else None)
        return prepare_model(model, config, calibration)

    def export(model):
        config, ranks = model.rankdyna_config, rank_pattern(model)
        compression.full_ranks = full_ranks(model)
        return model, export_model(model), config.to_dict(), ranks

    names = tuple(f.name for f in dataclasses.fields(RankDynaArguments) if f.name != "rankdyna")
    compression = Compression("rankdyna", prepare, [callback, RankDynaWandbCallback()], export, names)
    return compression


def registry_compression(model_args: ModelArguments) -> Compression:
    """A baseline from rankdyna_trainer.methods: post-hoc (compress, then this run fine-tunes) or AdaLoRA."""
    method = get_method(model_args.compression_method)
    state = {}

    def prepare(model, overrides):
        compression.dense_shapes = linear_shapes(model)
        fields = {f.name for f in dataclasses.fields(method.config_class)} if method.config_class else set()
        extra = {}
        if model_args.compression_fisher_batches and "max_fisher_batches" in fields:
            extra["max_fisher_batches"] = model_args.compression_fisher_batches
        if "max_calibration_batches" in fields:
            extra["max_calibration_batches"] = model_args.compression_calibration_batches
        if "rank_multiple" in fields:
            extra["rank_multiple"] = model_args.compression_rank_multiple
        state["config"] = method.make_config(target_budget=model_args.compression_budget, model=model,
                                             total_steps=compression.total_steps, **extra)
        if method.post_hoc:
            state["modules"] = method.compress(model, state["config"], compression.train_loader)
            return model
        model, callbacks = method.prepare(model, state["config"])
        compression.callbacks[:] = callbacks
        return model

    def export(model):
        if method.post_hoc:
            modules = state["modules"]
        else:
            model, modules = method.export(model)
        ranks = {name: e.get("rank", min(e["in_features"], e["out_features"])) for name, e in modules.items()}
        config = state["config"]
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return model, modules, json.loads(json.dumps(config, default=str)), ranks

    compression = Compression(model_args.compression_method, prepare, [], export, ())
    return compression


def build_compression(rankdyna_args: RankDynaArguments,
                      model_args: ModelArguments | None = None) -> Compression | None:
    """The compression method of this run (None: plain fine-tuning)."""
    if rankdyna_args.rankdyna:
        return rankdyna_compression(rankdyna_args, model_args)
    if model_args is not None and model_args.compression_method not in (None, "dense", "rankdyna"):
        return registry_compression(model_args)
    return None


def export_compressed(compression: Compression, model, tokenizer, output_dir: str) -> dict:
    """Export, save next to the tokenizer, draw the allocation; returns the compression summary."""
    model, modules, method_config, ranks = compression.export(model)
    save_compressed_model(model, output_dir, modules, compression.method, method_config)
    tokenizer.save_pretrained(output_dir)
    if not modules:  # AdaLoRA: adapters merged, nothing compressed
        return {"method": compression.method, "compressed_params": None, "dense_params": None, "params_fraction": 1.0}
    shapes = {name: compression.dense_shapes.get(name, (e["out_features"], e["in_features"]))
              for name, e in modules.items()}
    full = {name: compression.full_ranks.get(name) or min(shapes[name]) for name in ranks}
    save_rank_heatmap(ranks, full, os.path.join(output_dir, HEATMAP_FILE),
                      title=f"{compression.method}: kept rank per matrix ({os.path.basename(output_dir)})")
    compressed_params = read_compression_config(output_dir)["compressed_params"]
    dense_params = sum(out_features * in_features for out_features, in_features in shapes.values())
    log_exported_model(output_dir, compressed_params, dense_params)
    return {"method": compression.method, "compressed_params": compressed_params, "dense_params": dense_params,
            "params_fraction": compressed_params / dense_params}


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict:
    """Run the job ``argv`` describes; ``extra_callbacks`` join the Trainer after the compression's own (a
    benchmark's timer, for one)."""
    model_args, data_args, rankdyna_args, search_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    task = get_task(data_args.task_name)
    with reported_as("--model_name_or_path", OSError, ImportError):
        model_path = resolve_model_path(model_args.model_name_or_path)
    compression = build_compression(rankdyna_args, model_args)
    if compression is not None and is_compressed_model_dir(model_path):
        raise UsageError(f"--model_name_or_path {model_path} is already compressed; --compression_method "
                         f"{compression.method} needs a dense model.")

    searching = search_args.hyperparameter_search > 0
    with reported_as(data_source_flag(data_args), ValueError, OSError):
        raw = load_raw_datasets(data_args, training_args, need_train=training_args.do_train or searching)
    with reported_as("--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path", OSError):
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path)
    encoded = tokenize(raw, tokenizer, task, data_args.max_seq_length)
    validation_splits = [s for s in encoded if s.startswith("validation")]
    if compression is not None and "train" in encoded:
        # Post-hoc methods read labelled task batches when compressing; AdaLoRA schedules over the run's steps.
        compression.train_loader = torch.utils.data.DataLoader(
            encoded["train"], batch_size=training_args.per_device_train_batch_size, shuffle=True,
            collate_fn=DataCollatorWithPadding(tokenizer),
            generator=torch.Generator().manual_seed(training_args.seed))
        steps_per_epoch = math.ceil(len(compression.train_loader) / training_args.gradient_accumulation_steps)
        compression.total_steps = (training_args.max_steps if training_args.max_steps > 0
                                   else math.ceil(training_args.num_train_epochs * steps_per_epoch))

    hp_space = None
    if searching:
        hp_space = search_space(search_args.sweep_config, compression)

    sizes = {}

    def model_init(trial=None):
        with reported_as("--model_name_or_path", OSError):
            model = load_model(model_path, task)
        sizes["model_params_before"] = count_parameters(model)
        if compression is None:
            return model
        # Optuna returns a trial's earlier suggestion when asked again, so this reads the values Trainer sets.
        trial_values = hp_space(trial) if (trial is not None and hp_space is not None) else {}
        overrides = {k: v for k, v in trial_values.items() if k in compression.search_arguments}
        return compression.prepare(model, overrides)

    set_seed(training_args.seed)
    trainer = Trainer(
        model=None if searching else model_init(),
        model_init=model_init if searching else None,
        args=training_args,
        train_dataset=encoded.get("train"),
        eval_dataset=encoded[validation_splits[0]] if validation_splits else None,
        processing_class=tokenizer,
        compute_metrics=compute_metrics_for(task.name),
        callbacks=(compression.callbacks if compression else []) + list(extra_callbacks or []),
    )

    if searching:
        return run_search(trainer, hp_space, task, search_args.hyperparameter_search, training_args.output_dir)

    results = {"output_dir": training_args.output_dir}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = {**train_result.metrics, "train_samples": len(encoded["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if compression is not None:
            summary = export_compressed(compression, trainer.model, tokenizer, training_args.output_dir)
            trainer.save_metrics("compression", summary, combined=False)
            results["compression"] = summary
            # Evaluate what a user gets back from disk, not the in-memory model.
            trainer.model = trainer.model_wrapped = AutoModelForSequenceClassification.from_pretrained(
                training_args.output_dir).to(training_args.device)
        else:
            trainer.save_model()
        results["train"] = metrics

    if training_args.do_eval:
        eval_metrics, predictions = {}, {}
        for split in validation_splits:
            prefix = "eval" if split == validation_splits[0] else "eval_" + split.removeprefix("validation_")
            # predict() returns the same metrics as evaluate() plus the predictions, which the summary checks.
            output = trainer.predict(encoded[split], metric_key_prefix=prefix)
            eval_metrics.update({**evaluation_keys(output.metrics, prefix), f"{prefix}_samples": len(encoded[split])})
            predictions[split] = predicted_labels(task, output.predictions)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results["eval"] = eval_metrics
        first = validation_splits[0]
        results["quality"] = quality_check(task, eval_metrics, predictions[first], encoded[first]["label"])
        if (results.get("compression") or {}).get("compressed_params") is not None:
            quality = results["quality"]
            write_model_card(training_args.output_dir, trainer, metric_name=f"dev {quality['metric']}",
                             metric=quality["value"], floor=quality["floor"], dataset=f"glue/{task.name}")

    finish_wandb()
    results["model_params"] = {"before": sizes.get("model_params_before"), "after": count_parameters(trainer.model)}
    summary = closing_summary(task, results, training_args.output_dir)
    os.makedirs(training_args.output_dir, exist_ok=True)
    with open(os.path.join(training_args.output_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    return results


def evaluation_keys(metrics: dict, prefix: str) -> dict:
    """Only the evaluation's own metrics: every Trainer log also carries training-time values that callbacks add
    (``epoch``, ``rankdyna/*``), which do not describe the evaluated model."""
    return {key: value for key, value in metrics.items() if key.startswith(prefix + "_")}


def search_space(sweep_config: str, compression: Compression | None):
    """The optuna space of the sweep YAML, checked against the arguments a trial can set."""
    parameters = read_sweep_config(sweep_config)["parameters"]
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    method_fields = set(compression.search_arguments) if compression else set()
    rankdyna_fields = {f.name for f in dataclasses.fields(RankDynaArguments)}
    for name in parameters:
        if name in rankdyna_fields and name not in method_fields:
            raise ValueError(f"{sweep_config} searches {name!r}, which needs --rankdyna.")
        if name not in training_fields and name not in method_fields:
            raise ValueError(f"{sweep_config} searches {name!r}, which is not a run_glue.py argument a trial can set "
                             "(TrainingArguments or the compression method's options).")
    return optuna_space(parameters)


def run_search(trainer: Trainer, hp_space, task, n_trials: int, output_dir: str) -> dict:
    objective = "eval_" + main_metric(task.name)
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda metrics: metrics[objective], n_trials=n_trials,
        direction="maximize", backend="optuna",
    )
    os.makedirs(output_dir, exist_ok=True)
    summary = {"objective": objective, "best_trial": best.run_id, "best_value": best.objective,
               "best_hyperparameters": best.hyperparameters, "n_trials": n_trials}
    with open(os.path.join(output_dir, "best_run.json"), "w") as f:
        json.dump(summary, f, indent=2)
    finish_wandb()
    logger.info("Best of %d trials (%s = %.4f): %s -> %s", n_trials, objective, best.objective,
                best.hyperparameters, os.path.join(output_dir, "best_run.json"))
    return {"search": summary}


def finish_wandb() -> None:
    # Close the run here so that later runs in the same process (tests, notebooks) start their own.
    run = active_wandb_run()
    if run is not None:
        run.finish()


# --------------------------------------------------------------------------------------------------------------
# Closing summary: is the model any good, how small is it, where is it
# --------------------------------------------------------------------------------------------------------------
def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def predicted_labels(task, predictions) -> np.ndarray:
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return np.squeeze(logits, -1) if task.is_regression else np.argmax(logits, axis=-1)


def quality_check(task, eval_metrics: dict, predictions: np.ndarray, references) -> dict:
    """The dev metric next to the trivial floor (best constant prediction) and how varied the predictions are.

    ``warnings`` lists what makes the model degenerate: not above the floor, or one predicted class/value.
    """
    main = main_metric(task.name)
    floor = constant_prediction_floor(task.name, references)
    spread = prediction_spread(task.name, predictions)
    value = eval_metrics.get(f"eval_{main}")
    warnings = []
    if value is None or not np.isfinite(value) or value <= floor[main]:
        warnings.append(f"dev {main} {_pct(value)} is not above the constant-prediction floor {_pct(floor[main])}")
    if spread["distinct"] <= 1:
        warnings.append("every dev example gets the same prediction")
    return {"metric": main, "value": value, "floor": floor[main], "prediction_spread": spread, "warnings": warnings}


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _folder_bytes(directory: str, suffixes=(".safetensors", ".bin")) -> int:
    if not os.path.isdir(directory):
        return 0
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.endswith(suffixes))


def closing_summary(task, results: dict, output_dir: str) -> dict:
    summary = {"task": task.name, "output_dir": output_dir, "quality": results.get("quality"),
               "compression": results.get("compression"), "model_params": results["model_params"],
               "model_bytes_on_disk": _folder_bytes(output_dir)}
    quality = summary["quality"]
    for warning in quality["warnings"] if quality else []:
        logger.warning("DEGENERATE MODEL: %s.", warning)
    return summary


def print_summary(summary: dict) -> None:
    """The run's last lines: the metric beside its floor, what the compression kept, where the files are."""
    lines = ["", "=" * 100, f"Summary ({summary['task']})"]
    quality = summary["quality"]
    if quality:
        verdict = "OK: above the floor" if not quality["warnings"] else "WARNING: " + "; ".join(quality["warnings"])
        lines.append(f"  dev {quality['metric']}: {_pct(quality['value'])}   constant-prediction floor: "
                     f"{_pct(quality['floor'])}   -> {verdict}")
    compression = summary["compression"]
    if compression and compression.get("compressed_params") is not None:
        lines.append(f"  targeted weights kept: {compression['compressed_params']:,} of "
                     f"{compression['dense_params']:,} ({100 * compression['params_fraction']:.1f} %), "
                     f"method {compression['method']}")
    before, after = summary["model_params"]["before"], summary["model_params"]["after"]
    if before and after:
        lines.append(f"  whole model: {after:,} of {before:,} parameters ({100 * after / before:.1f} %)")
    if summary["model_bytes_on_disk"]:
        lines.append(f"  saved model: {summary['model_bytes_on_disk'] / 2**20:.1f} MiB on disk in "
                     f"{summary['output_dir']}/ (import rankdyna_trainer, then "
                     "AutoModelForSequenceClassification.from_pretrained)")
    files = [("eval_results.json", "dev-set metrics"), (SUMMARY_FILE, "this summary"),
             (HEATMAP_FILE, "kept rank per layer and matrix type"), ("rank_pattern.json", "final ranks"),
             ("README.md", "model card (what push_to_hub publishes)")]
    present = [(name, what) for name, what in files if os.path.isfile(os.path.join(summary["output_dir"], name))]
    lines += [f"  {summary['output_dir']}/{name:<24} {what}" for name, what in present]
    lines.append("=" * 100)
    print("\n".join(lines), flush=True)


def cli(argv: list[str] | None = None) -> int:
    """The command line: a :class:`UsageError` becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except UsageError as err:
        print(f"run_glue.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
