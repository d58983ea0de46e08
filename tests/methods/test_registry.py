import pytest
from transformers import Trainer, TrainingArguments

from rankdyna_trainer.methods import METHODS, get_method

from ..compression_checks import assert_budget_met, assert_reloads_identically, targeted_dense_params, task_dataloader
from ..conftest import random_classification_dataset, tiny_bert


def test_registry_names_every_method_and_rejects_unknown_ones():
    assert set(METHODS) == {"dense", "rankdyna", "mpo", "adalora", "svd", "fwsvd", "tfwsvd", "ars", "lorap", "svdllm"}
    for method in METHODS.values():
        assert (method.compress is not None) == method.post_hoc
        assert (method.prepare is not None and method.export is not None) != method.post_hoc
    with pytest.raises(ValueError, match="fwsvd"):
        get_method("fw-svd")


@pytest.mark.parametrize("name", ["svd", "fwsvd"])
def test_post_hoc_methods_through_the_registry(name, tmp_path):
    model = tiny_bert()
    method = get_method(name)
    modules = method.compress(model, method.make_config(target_budget=0.4), task_dataloader())
    assert_budget_met(modules, targeted_dense_params(tiny_bert()), 0.4)
    assert_reloads_identically(model, modules, name, tmp_path)


def test_rankdyna_through_the_registry_meets_the_budget(tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    method = get_method("rankdyna")
    config = method.make_config(target_budget=0.5, reallocation_interval=2)
    model, callbacks = method.prepare(model, config)
    args = TrainingArguments(output_dir=str(tmp_path / "train"), max_steps=12, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(), callbacks=callbacks).train()
    model, modules = method.export(model)
    assert_budget_met(modules, dense, 0.5)
    assert_reloads_identically(model, modules, "rankdyna", tmp_path / "export")
