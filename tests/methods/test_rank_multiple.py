"""``rank_multiple``: every method that allocates ranks keeps them in multiples, within the same budget."""

import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import exported_params
from rankdyna_trainer.methods import get_method

from ..compression_checks import assert_reloads_identically, targeted_dense_params, task_dataloader
from ..conftest import random_classification_dataset, tiny_bert

MULTIPLE = 4


def assert_ranks_rounded_within_budget(modules: dict, dense: int, budget: float) -> None:
    for name, entry in modules.items():
        if entry["type"] == "low_rank":
            assert entry["rank"] % MULTIPLE == 0, (name, entry["rank"])
    spent = sum(exported_params(e) for e in modules.values())
    assert spent <= int(budget * dense)
    assert spent >= 0.8 * budget * dense  # rounding leaves at most a few blocks unspent


@pytest.mark.parametrize("method,extra", [("svd", {}), ("fwsvd", {}), ("tfwsvd", {"als_iterations": 1}),
                                          ("ars", {"mask_steps": 2})])
@pytest.mark.parametrize("budget", [0.5, 0.33, 0.2])
def test_post_hoc_methods_keep_ranks_in_multiples(method, extra, budget, tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    spec = get_method(method)
    modules = spec.compress(model, spec.make_config(target_budget=budget, rank_multiple=MULTIPLE, **extra),
                            task_dataloader())
    assert_ranks_rounded_within_budget(modules, dense, budget)
    if method == "svd" and budget == 0.33:
        # Without the option the uniform rank (6 here) is not a multiple of 4.
        plain = spec.compress(tiny_bert(), spec.make_config(target_budget=budget), None)
        assert any(e["rank"] % MULTIPLE for e in plain.values() if e["type"] == "low_rank")
        assert_reloads_identically(model, modules, method, tmp_path)


def test_rankdyna_training_ends_on_rounded_ranks_within_the_budget(tmp_path):
    config = RankDynaConfig(target_budget=0.33, reallocation_interval=2, rank_multiple=MULTIPLE)
    model = tiny_bert()
    dense = targeted_dense_params(model)
    prepare_model(model, config)
    args = TrainingArguments(str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(96),
            callbacks=[RankDynaCallback(config)]).train()
    assert_ranks_rounded_within_budget(export_model(model), dense, 0.33)


@pytest.mark.parametrize("config_class", ["rankdyna", "svd", "fwsvd", "tfwsvd", "ars"])
def test_bad_rank_multiple_is_rejected_naming_the_field(config_class):
    with pytest.raises(ValueError, match=r"rank_multiple must be an integer >= 1.*got 0"):
        get_method(config_class).make_config(target_budget=0.5, rank_multiple=0)
