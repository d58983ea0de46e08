import math

import optuna
import pytest

from rankdyna_trainer.experiment.sweep import optuna_space, read_sweep_config

PARAMETERS = {
    "learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
    "rankdyna_budget": {"values": [0.3, 0.5]},
    "rankdyna_reallocation_interval": {"min": 2, "max": 9},
    "warmup_steps": {"min": 0.0, "max": 0.2},
    "seed": {"value": 7},
}


def test_optuna_space_samples_inside_the_wandb_space():
    hp_space = optuna_space(PARAMETERS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        values = hp_space(trial)
        assert hp_space(trial) == values  # asked again (as model_init does), a trial gives the same values
        assert 1e-5 <= values["learning_rate"] <= 1e-3
        assert values["rankdyna_budget"] in (0.3, 0.5)
        interval = values["rankdyna_reallocation_interval"]
        assert isinstance(interval, int) and 2 <= interval <= 9
        assert 0.0 <= values["warmup_steps"] <= 0.2 and values["seed"] == 7
        study.tell(trial, 0.0)
    distribution = study.trials[0].distributions["learning_rate"]
    assert distribution.log and math.isclose(distribution.low, 1e-5)


def test_unsupported_distribution_is_a_clear_error():
    with pytest.raises(ValueError, match=r"'lr' uses distribution 'q_normal'"):
        optuna_space({"lr": {"distribution": "q_normal", "min": 0, "max": 1}})
    with pytest.raises(ValueError, match=r"'lr' needs 'value', 'values' or 'min' and 'max'"):
        optuna_space({"lr": {"min": 0}})


def test_read_sweep_config_needs_parameters(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("program: run_glue.py\nmethod: random\n")
    with pytest.raises(ValueError, match="non-empty 'parameters' mapping"):
        read_sweep_config(str(path))
