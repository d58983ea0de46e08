#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task, optionally compressing it with RankDyna in the same run.

    python scripts/run_glue.py --model_name_or_path minilm --task_name rte --glue_dir ../shared/data/glue \
        --rankdyna --rankdyna_budget 0.5 --do_train --do_eval --output_dir outputs/rte-rankdyna

Arguments follow transformers' text-classification example (every ``TrainingArguments`` option works), plus a
RankDyna group (``--rankdyna`` switches it on) and ``--hyperparameter_search N`` (optuna over the space of
``scripts/sweep_rankdyna.yaml``, each trial one W&B run). ``python scripts/run_glue.py --help`` lists them all.

With ``--rankdyna`` the run trains the factorized model under the shrinking budget, exports the kept ranks as
small ``Linear(n, r) -> Linear(r, m)`` pairs, saves that compressed model (reload it with
``rankdyna_trainer.load_compressed_model``), draws the final allocation (``rank_heatmap.png``) and evaluates the
reloaded compressed model. Metrics go to ``<output_dir>/eval_results.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
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
    load_compressed_model,
    prepare_model,
    rank_pattern,
    save_compressed_model,
)
from rankdyna_trainer.export import COMPRESSION_CONFIG_FILE  # noqa: E402
from rankdyna_trainer.experiment.glue_data import GLUE_TASKS, get_task, load_glue, load_glue_files  # noqa: E402
from rankdyna_trainer.experiment.glue_metrics import load_glue_metric, main_metric  # noqa: E402
from rankdyna_trainer.methods import METHODS, get_method  # noqa: E402
from rankdyna_trainer.packaged_models import minilm_path  # noqa: E402
from rankdyna_trainer.experiment.rank_plots import save_rank_heatmap  # noqa: E402
from rankdyna_trainer.experiment.sweep import optuna_space, read_sweep_config  # noqa: E402
from rankdyna_trainer.experiment.wandb_logging import RankDynaWandbCallback, active_wandb_run, log_exported_model  # noqa: E402

logger = logging.getLogger("run_glue")

MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path}  # short names for packaged models
DEFAULT_SWEEP_CONFIG = str(Path(__file__).resolve().parent / "sweep_rankdyna.yaml")
HEATMAP_FILE = "rank_heatmap.png"
FISHER_METHODS = ("fwsvd", "tfwsvd", "ars")  # methods that read --compression_fisher_batches


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Model folder or hub id; 'minilm' is the packaged all-MiniLM-L6-v2. A folder written by "
                  "a compressing run (it holds compression_config.json) loads as the compressed model."}
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    compression_method: Optional[str] = field(
        default=None,
        metadata={"help": f"One of {sorted(METHODS)} (rankdyna_trainer.methods). 'rankdyna' is --rankdyna; "
                  "'svd', 'fwsvd', 'tfwsvd', 'ars', 'svdllm' compress --model_name_or_path, which should already be "
                  "fine-tuned on the task, then fine-tune the factorized model (their second round); 'adalora' "
                  "trains peft AdaLoRA adapters and exports the merged dense model."},
    )
    compression_budget: float = field(
        default=0.5, metadata={"help": "Parameter budget of --compression_method (fraction of the targeted weights)."}
    )
    compression_fisher_batches: Optional[int] = field(
        default=None, metadata={"help": "Training batches for the Fisher information of fwsvd/tfwsvd/ars (None: all)."}
    )
    compression_calibration_batches: int = field(
        default=16,
        metadata={"help": "Training batches used as calibration inputs by svdllm and by RankDyna's whitened start "
                  "(--rankdyna_init whitened)."},
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
    """``--rankdyna`` plus the RankDynaConfig options; unset options take RankDynaConfig's defaults."""

    rankdyna: bool = field(default=False, metadata={"help": "Compress with RankDyna while fine-tuning."})
    rankdyna_budget: Optional[float] = field(
        default=None, metadata={"help": "Final parameter budget, fraction of the targeted matrices' dense weights."})
    rankdyna_initial_budget: Optional[float] = field(default=None, metadata={"help": "Budget when pruning starts."})
    rankdyna_warmup_fraction: Optional[float] = field(
        default=None, metadata={"help": "Fraction of steps before pruning starts."})
    rankdyna_final_fraction: Optional[float] = field(
        default=None, metadata={"help": "Fraction of steps at the end with the allocation frozen."})
    rankdyna_reallocation_interval: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps between reallocations."})
    rankdyna_beta1: Optional[float] = field(default=None, metadata={"help": "EMA coefficient of the sensitivity."})
    rankdyna_beta2: Optional[float] = field(default=None, metadata={"help": "EMA coefficient of the uncertainty."})
    rankdyna_singular_value_signal: Optional[str] = field(
        default=None,
        metadata={"help": "'gate' (default) or 'singular_value' (AdaLoRA's s*dL/ds); see docs/method.md."})
    rankdyna_orth_reg_weight: Optional[float] = field(
        default=None, metadata={"help": "Weight of the orthogonality regularizer (0 disables it)."})
    rankdyna_init_rank: Optional[int] = field(default=None, metadata={"help": "Keep the top-k groups at SVD time."})
    rankdyna_factor_budget: Optional[float] = field(
        default=None, metadata={"help": "Factor storage per matrix at factorization time, fraction of its dense "
                                "weights (default 1.0; 2 keeps every group)."})
    rankdyna_init: Optional[str] = field(
        default=None, metadata={"help": "'svd' (default) or 'whitened' (calibrated on "
                                "--compression_calibration_batches training batches)."})
    rankdyna_whitening_damping: Optional[float] = field(
        default=None, metadata={"help": "Ridge of the whitened start, relative to the inputs' mean square."})
    rankdyna_target_modules: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated module-name suffixes to factorize (default: per model type)."})

    def given_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "rankdyna" and getattr(self, f.name) is not None}

    def to_config(self, overrides: dict | None = None) -> RankDynaConfig:
        """The RankDynaConfig of these options (``overrides``: a search trial's values by argument name)."""
        options = {**self.given_options(), **(overrides or {})}
        if "rankdyna_target_modules" in options:
            options["rankdyna_target_modules"] = [t.strip() for t in options["rankdyna_target_modules"].split(",")]
        renamed = {"rankdyna_budget": "target_budget"}
        return RankDynaConfig(**{renamed.get(k, k.removeprefix("rankdyna_")): v for k, v in options.items()})


@dataclass
class SearchArguments:
    hyperparameter_search: int = field(
        default=0, metadata={"help": "Run N optuna trials (Trainer.hyperparameter_search) instead of one run."})
    sweep_config: str = field(
        default=DEFAULT_SWEEP_CONFIG, metadata={"help": "W&B sweep YAML whose 'parameters' are the search space."})


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, RankDynaArguments, SearchArguments, TrainingArguments)


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(*args)
    return args


def check_arguments(model_args, data_args, rankdyna_args, search_args, training_args) -> None:
    """Fail before loading anything when the arguments cannot make a run."""
    if data_args.task_name is None:
        raise ValueError(f"--task_name is required: one of {sorted(GLUE_TASKS)}.")
    get_task(data_args.task_name)  # unknown task -> ValueError naming the choices
    if model_args.compression_calibration_batches < 1:
        raise ValueError(f"--compression_calibration_batches must be >= 1, "
                         f"got {model_args.compression_calibration_batches}.")
    method = model_args.compression_method
    if method is not None:
        get_method(method)  # unknown method -> ValueError naming the choices
        if rankdyna_args.rankdyna and method != "rankdyna":
            raise ValueError(f"--rankdyna and --compression_method {method} pick two methods; keep one.")
        if method == "rankdyna":
            rankdyna_args.rankdyna = True
            if rankdyna_args.rankdyna_budget is None:
                rankdyna_args.rankdyna_budget = model_args.compression_budget
        elif method != "dense" and not training_args.do_train:
            raise ValueError(f"--compression_method {method} trains (fine-tuning after compression, or adapters): "
                             "add --do_train.")
        elif method != "dense" and search_args.hyperparameter_search:
            raise ValueError(f"--hyperparameter_search supports --compression_method rankdyna or dense, not {method}.")
    given = rankdyna_args.given_options()
    if given and not rankdyna_args.rankdyna:
        flags = ", ".join(f"--{name}" for name in given)
        raise ValueError(f"{flags} only take effect with --rankdyna; add --rankdyna to compress, or drop them.")
    if rankdyna_args.rankdyna:
        rankdyna_args.to_config()  # RankDynaConfig validates every value
        if not (training_args.do_train or search_args.hyperparameter_search):
            raise ValueError("--rankdyna compresses while training: add --do_train. To evaluate a compressed model, "
                             "pass its folder as --model_name_or_path without --rankdyna.")
    if not (training_args.do_train or training_args.do_eval or search_args.hyperparameter_search):
        raise ValueError("Nothing to do: pass --do_train and/or --do_eval (or --hyperparameter_search N).")
    if search_args.hyperparameter_search < 0:
        raise ValueError(f"--hyperparameter_search takes a number of trials >= 0, "
                         f"got {search_args.hyperparameter_search}.")


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
    if os.path.isfile(os.path.join(model_path, COMPRESSION_CONFIG_FILE)):
        return load_compressed_model(model_path)
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


def calibration_batches(loader, count: int) -> list[dict]:
    """The first ``count`` training batches, inputs only (calibration needs no labels)."""
    if loader is None:
        raise ValueError("Calibration needs the training set: add --do_train.")
    return [{k: v for k, v in batch.items() if k != "labels"} for batch in itertools.islice(loader, count)]


def rankdyna_compression(rankdyna_args: RankDynaArguments, model_args: ModelArguments | None = None) -> Compression:
    callback = RankDynaCallback()
    calibration_count = model_args.compression_calibration_batches if model_args is not None else 16

    def prepare(model, overrides):
        config = rankdyna_args.to_config(overrides)
        callback.config = config  # a search trial's config replaces the previous trial's
        calibration = (calibration_batches(compression.train_loader, calibration_count)
                       if config.init == "whitened" else None)
        return prepare_model(model, config, calibration)

    def export(model):
        config, ranks = model.rankdyna_config, rank_pattern(model)
        return model, export_model(model), config.to_dict(), ranks

    names = tuple(f.name for f in dataclasses.fields(RankDynaArguments) if f.name != "rankdyna")
    compression = Compression("rankdyna", prepare, [callback, RankDynaWandbCallback()], export, names)
    return compression


def registry_compression(model_args: ModelArguments) -> Compression:
    """A baseline from rankdyna_trainer.methods: post-hoc (compress, then this run fine-tunes) or AdaLoRA."""
    method = get_method(model_args.compression_method)
    state = {}

    def prepare(model, overrides):
        if method.post_hoc:
            extra = {}
            if model_args.compression_fisher_batches and model_args.compression_method in FISHER_METHODS:
                extra["max_fisher_batches"] = model_args.compression_fisher_batches
            if model_args.compression_method == "svdllm":
                extra["max_calibration_batches"] = model_args.compression_calibration_batches
            state["config"] = method.make_config(target_budget=model_args.compression_budget, **extra)
            state["modules"] = method.compress(model, state["config"], compression.train_loader)
            return model
        state["config"] = method.make_config(model=model, total_steps=compression.total_steps)
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


def build_compression(rankdyna_args: RankDynaArguments, model_args: ModelArguments | None = None) -> Compression | None:
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
    full_ranks = {name: min(e["in_features"], e["out_features"]) for name, e in modules.items()}
    save_rank_heatmap(ranks, full_ranks, os.path.join(output_dir, HEATMAP_FILE),
                      title=f"{compression.method}: kept rank per matrix ({os.path.basename(output_dir)})")
    with open(os.path.join(output_dir, COMPRESSION_CONFIG_FILE)) as f:
        compressed_params = json.load(f)["compressed_params"]
    dense_params = sum(e["in_features"] * e["out_features"] for e in modules.values())
    log_exported_model(output_dir, compressed_params, dense_params)
    return {"method": compression.method, "compressed_params": compressed_params, "dense_params": dense_params,
            "params_fraction": compressed_params / dense_params}


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, rankdyna_args, search_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    task = get_task(data_args.task_name)
    model_path = resolve_model_path(model_args.model_name_or_path)
    compression = build_compression(rankdyna_args, model_args)
    if compression is not None and os.path.isfile(os.path.join(model_path, COMPRESSION_CONFIG_FILE)):
        raise ValueError(f"{model_path} is already compressed; --{compression.method} needs a dense model.")

    searching = search_args.hyperparameter_search > 0
    raw = load_raw_datasets(data_args, training_args, need_train=training_args.do_train or searching)
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

    def model_init(trial=None):
        model = load_model(model_path, task)
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
        callbacks=compression.callbacks if compression else None,
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
            trainer.model = trainer.model_wrapped = load_compressed_model(training_args.output_dir)
        else:
            trainer.save_model()
        results["train"] = metrics

    if training_args.do_eval:
        eval_metrics = {}
        for split in validation_splits:
            prefix = "eval" if split == validation_splits[0] else "eval_" + split.removeprefix("validation_")
            metrics = trainer.evaluate(eval_dataset=encoded[split], metric_key_prefix=prefix)
            eval_metrics.update({**metrics, f"{prefix}_samples": len(encoded[split])})
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results["eval"] = eval_metrics

    finish_wandb()
    print_where_results_are(training_args.output_dir, training_args.do_eval,
                            compression is not None and training_args.do_train)
    return results


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


def print_where_results_are(output_dir: str, evaluated: bool, compressed: bool) -> None:
    lines = [f"Results in {output_dir}/:"]
    if evaluated:
        lines.append("  eval_results.json    dev-set metrics (GLUE metric of the task)")
    if compressed:
        lines += ["  compression_config.json + model.safetensors   compressed model "
                  "(rankdyna_trainer.load_compressed_model)",
                  f"  {HEATMAP_FILE}     kept rank per layer and matrix type",
                  "  rank_pattern.json    final ranks and parameter counts"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
