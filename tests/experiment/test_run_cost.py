"""RunCost: step times and the training peak of a real Trainer run."""

import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.experiment.run_cost import RunCost, hook_seconds, phase_step_seconds
from tests.conftest import random_classification_dataset, tiny_bert


def test_records_every_optimizer_step_and_the_training_peak(tmp_path):
    config = RankDynaConfig(target_budget=0.3, reallocation_interval=2)
    model = prepare_model(tiny_bert(), config)
    cost = RunCost()
    args = TrainingArguments(str(tmp_path), max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             save_strategy="no", report_to=[], use_cpu=True)
    with hook_seconds(RankDynaCallback, "on_pre_optimizer_step") as rankdyna_seconds:
        Trainer(model=model, args=args, train_dataset=random_classification_dataset(),
                callbacks=[RankDynaCallback(config), cost]).train()
    assert RankDynaCallback.on_pre_optimizer_step.__name__ == "on_pre_optimizer_step"  # the class is restored
    summary = cost.summary()
    assert summary["steps"] == 12 and len(summary["all_step_cpu_seconds"]) == 12  # optimizer steps, not micro-batches
    assert all(t > 0 for t in summary["all_step_seconds"])
    assert summary["train_seconds"] >= sum(summary["all_step_seconds"])
    assert summary["peak_bytes"] >= summary["start_bytes"] > 0
    assert set(summary["step_seconds"]) == {"start", "middle", "end"}
    # The parts tile each step; RankDyna's pre-optimizer hook (once per optimizer step) runs inside the first.
    parts = cost.step_parts
    assert set(summary["step_part_seconds"]) == set(parts) == {"forward_backward", "optimizer", "after"}
    for i, total in enumerate(summary["all_step_seconds"]):
        assert all(parts[p][i] > 0 for p in parts)
        assert sum(parts[p][i] for p in parts) == pytest.approx(total, rel=1e-6)
    assert len(rankdyna_seconds) == 12
    assert all(0 < r < fb for r, fb in zip(rankdyna_seconds, parts["forward_backward"]))


def test_phase_medians_come_from_their_part_of_the_run():
    times = [9.0] * 2 + [3.0] * 18 + [2.0] * 60 + [1.0] * 20
    assert phase_step_seconds(times) == {"start": 3.0, "middle": 2.0, "end": 1.0}
    with pytest.raises(ValueError, match="at least 10 steps, got 4"):
        phase_step_seconds([1.0] * 4)


def _schedule(target=0.2, warmup=0.3, final=0.2, interval=10):
    from rankdyna_trainer.budget import ParameterBudget

    return ParameterBudget.from_fractions(1000, 1.0, target, 500, warmup, final, interval)


def test_schedule_step_cost_follows_the_schedule():
    from rankdyna_trainer.experiment.run_cost import schedule_step_cost

    assert schedule_step_cost({0.1: 0.7, 1.0: 0.7}, _schedule()) == pytest.approx(0.7)  # flat costs: the same mean
    linear = {0.0: 0.0, 1.0: 1.0}
    warm_up = 150 / 500  # at full cost; then pruning costs between the target's and full
    final = 100 / 500 * 0.2  # the last allocation's steps at the target
    assert warm_up + final < schedule_step_cost(linear, _schedule()) < warm_up + final + 250 / 500
    # A longer warm-up or fewer reallocations (each runs every group) change the mean the right way.
    assert schedule_step_cost(linear, _schedule(warmup=0.5)) > schedule_step_cost(linear, _schedule())
    every_step = (150 + 250 + 1 + 99 * 0.2) / 500  # interval 1: every pruning step and the last allocation run all
    assert schedule_step_cost(linear, _schedule(interval=1)) == pytest.approx(every_step)
    assert schedule_step_cost(linear, _schedule(interval=10)) < every_step
    with pytest.raises(ValueError, match=r"from the target \(0.2\) to 1"):
        schedule_step_cost({0.5: 0.6, 1.0: 1.0}, _schedule())
