"""GlueMetric against the textbook formulas written out with plain loops."""

import math
import random

import pytest

from rankdyna_trainer.experiment.glue_metrics import GlueMetric, load_glue_metric, main_metric


def _counts(pred, gold):
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    return tp, tn, fp, fn


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _ranks(values):  # no ties in the data below
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


def _labels(n, seed, classes=2):
    rng = random.Random(seed)
    return [rng.randrange(classes) for _ in range(n)], [rng.randrange(classes) for _ in range(n)]


def test_cola_matthews_correlation():
    pred, gold = _labels(200, 0)
    tp, tn, fp, fn = _counts(pred, gold)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    result = load_glue_metric("cola").compute(predictions=pred, references=gold)
    assert result == {"matthews_correlation": pytest.approx(expected)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_tasks(task):
    pred, gold = _labels(150, 1)
    tp, tn, fp, fn = _counts(pred, gold)
    result = load_glue_metric(task).compute(predictions=pred, references=gold)
    assert result == {"accuracy": pytest.approx((tp + tn) / 150), "f1": pytest.approx(2 * tp / (2 * tp + fp + fn))}


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    pred, gold = _labels(100, 2, classes=3 if task == "mnli" else 2)
    result = load_glue_metric(task).compute(predictions=pred, references=gold)
    assert result == {"accuracy": pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 100)}


def test_stsb_pearson_and_spearman_in_batches():
    rng = random.Random(3)
    gold = [rng.uniform(0, 5) for _ in range(80)]
    pred = [g + rng.gauss(0, 1.5) for g in gold]
    metric = load_glue_metric("stsb")
    for start in range(0, 80, 32):  # evaluate's add_batch path, as in a distributed or streamed evaluation
        metric.add_batch(predictions=pred[start:start + 32], references=gold[start:start + 32])
    result = metric.compute()
    assert result["pearson"] == pytest.approx(_pearson(pred, gold), rel=1e-5)
    assert result["spearmanr"] == pytest.approx(_pearson(_ranks(pred), _ranks(gold)), rel=1e-5)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown GLUE task 'glue'"):
        GlueMetric(config_name="glue")


def test_main_metric_per_task():
    assert [main_metric(t) for t in ("cola", "stsb", "mrpc", "qqp", "rte", "mnli")] == [
        "matthews_correlation", "pearson", "f1", "f1", "accuracy", "accuracy"]
