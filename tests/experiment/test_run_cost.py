"""RunCost: step times and the training peak of a real Trainer run."""

import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.experiment.run_cost import RunCost, phase_step_seconds
from tests.conftest import random_classification_dataset, tiny_bert


def test_records_every_optimizer_step_and_the_training_peak(tmp_path):
    config = RankDynaConfig(target_budget=0.3, reallocation_interval=2)
    model = prepare_model(tiny_bert(), config)
    cost = RunCost()
    args = TrainingArguments(str(tmp_path), max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             save_strategy="no", report_to=[], use_cpu=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(),
            callbacks=[RankDynaCallback(config), cost]).train()
    summary = cost.summary()
    assert summary["steps"] == 12 and len(summary["all_step_cpu_seconds"]) == 12  # optimizer steps, not micro-batches
    assert all(t > 0 for t in summary["all_step_seconds"])
    assert summary["train_seconds"] >= sum(summary["all_step_seconds"])
    assert summary["peak_bytes"] >= summary["start_bytes"] > 0
    assert set(summary["step_seconds"]) == {"start", "middle", "end"}


def test_phase_medians_come_from_their_part_of_the_run():
    times = [9.0] * 2 + [3.0] * 18 + [2.0] * 60 + [1.0] * 20
    assert phase_step_seconds(times) == {"start": 3.0, "middle": 2.0, "end": 1.0}
    with pytest.raises(ValueError, match="at least 10 steps, got 4"):
        phase_step_seconds([1.0] * 4)
