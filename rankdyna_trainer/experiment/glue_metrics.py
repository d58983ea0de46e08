"""The standard GLUE metric of each task as an ``evaluate`` metric that needs no hub download.

``evaluate.load("glue", task)`` fetches its script from the Hugging Face hub; :class:`GlueMetric` computes the
same numbers locally (Matthews correlation for CoLA, F1 and accuracy for MRPC/QQP, Pearson and Spearman for
STS-B, accuracy otherwise) with scikit-learn and SciPy, behind the same ``evaluate.Metric`` interface
(``add_batch``, ``compute``, distributed gathering).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from .glue_data import get_task

# The metric that ranks runs of a task (e.g. the objective of a hyperparameter search).
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}


def main_metric(task_name: str) -> str:
    return MAIN_METRIC.get(get_task(task_name).name, "accuracy")


class GlueMetric(evaluate.Metric):
    """``GlueMetric(config_name=<task>)``: the GLUE metric of one task, computed offline."""

    def _info(self) -> evaluate.MetricInfo:
        task = get_task(self.config_name)  # raises a clear error for an unknown task
        value = datasets.Value("float32" if task.is_regression else "int64")
        return evaluate.MetricInfo(
            description=f"GLUE metric of {task.name}, computed locally (same definitions as the hub's 'glue').",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description="predictions: predicted labels (class ids, or scores for stsb); references: gold.",
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        from scipy.stats import pearsonr, spearmanr
        from sklearn.metrics import f1_score, matthews_corrcoef

        task = get_task(self.config_name).name
        predictions, references = np.asarray(predictions), np.asarray(references)
        if task == "stsb":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearmanr": float(spearmanr(predictions, references)[0])}
        if task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        accuracy = float((predictions == references).mean())
        if task in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
        return {"accuracy": accuracy}


def load_glue_metric(task_name: str, experiment_id: str | None = None) -> evaluate.EvaluationModule:
    """The GLUE metric for ``task_name``: the local implementation (the hub's gives the same numbers but
    needs a network, and waits for timeouts without one)."""
    return GlueMetric(config_name=get_task(task_name).name, experiment_id=experiment_id)


def constant_prediction_floor(task_name: str, references) -> dict[str, float]:
    """The task's metrics for the best constant prediction on these references: the trivial floor.

    Classification: the class whose constant prediction scores best on the main metric (for RTE the dev
    majority, 52.7 % accuracy; for MRPC always "equivalent", F1 81.2; for CoLA every constant has MCC 0).
    Regression: a constant has no correlation, so the floor is 0.
    """
    task = get_task(task_name)
    references = np.asarray(references)
    if task.is_regression:
        return {"pearson": 0.0, "spearmanr": 0.0}
    metric = load_glue_metric(task.name)
    main = main_metric(task.name)
    candidates = [metric.compute(predictions=np.full_like(references, label), references=references)
                  for label in range(task.num_labels)]
    # sklearn returns 0 (not NaN) for MCC and F1 of a constant; keep NaN out of the comparison anyway.
    return max(candidates, key=lambda scores: np.nan_to_num(scores[main], nan=-np.inf))


def prediction_spread(task_name: str, predictions) -> dict[str, float]:
    """How varied a model's dev predictions are: a model that outputs one class (or one value) is degenerate,
    whatever its metric says. ``predictions`` are class ids (classification) or scores (regression)."""
    predictions = np.asarray(predictions)
    if get_task(task_name).is_regression:
        return {"distinct": float(len(np.unique(predictions.round(4)))), "std": float(predictions.std())}
    counts = np.bincount(predictions.astype(np.int64), minlength=get_task(task_name).num_labels)
    return {"distinct": float((counts > 0).sum()), "top_class_fraction": float(counts.max() / counts.sum())}
