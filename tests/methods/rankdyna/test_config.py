import pytest

from rankdyna_trainer import RankDynaConfig


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"target_budget": 0.0}, r"target_budget must be in \(0, 1\], got 0.0"),
        ({"target_budget": 1.5}, r"target_budget must be in \(0, 1\], got 1.5"),
        ({"target_budget": 0.5, "initial_budget": 0.3}, r"initial_budget must be in \[target_budget, 1\]"),
        ({"warmup_fraction": 0.6, "final_fraction": 0.5}, "leave steps to prune"),
        ({"final_fraction": 1.0}, r"final_fraction must be in \[0, 1\)"),
        ({"reallocation_interval": 0}, "reallocation_interval must be an integer >= 1"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"init_rank": 0}, "init_rank must be None or an integer >= 1"),
        ({"factor_budget": 0.0}, "factor_budget must be None or a number > 0"),
        ({"target_budget": 0.5, "factor_budget": 0.4, "untrained_groups": "dropped"},
         "factor_budget must be >= target_budget"),
        ({"untrained_groups": "pruned"}, "untrained_groups must be one of"),
        ({"init": "random"}, "init must be one of"),
        ({"whitening_damping": -0.1}, "whitening_damping must be a number >= 0"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight must be >= 0"),
        ({"singular_value_signal": "x"}, "singular_value_signal must be one of"),
        ({"target_modules": []}, "target_modules is an empty list"),
    ],
)
def test_bad_values_raise_actionable_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankDynaConfig(**kwargs)


def test_round_trip_through_save_and_from_pretrained(tmp_path):
    config = RankDynaConfig(target_modules=["query", "value"], target_budget=0.3, init_rank=16,
                            reallocation_interval=3, orth_reg_weight=0.1, init="whitened", factor_budget=None,
                            whitening_damping=0.0)
    config.save_pretrained(str(tmp_path))
    loaded = RankDynaConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, RankDynaConfig)
    assert loaded.to_dict() == config.to_dict()
