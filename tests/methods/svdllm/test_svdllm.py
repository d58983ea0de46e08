import pytest
import torch

from rankdyna_trainer.calibration import input_statistics
from rankdyna_trainer.export import LowRankLinear, exported_params
from rankdyna_trainer.factorize import whitened_factorization
from rankdyna_trainer.methods import get_method
from rankdyna_trainer.methods.lorap import uniform_rank
from rankdyna_trainer.methods.svdllm import SVDLLMConfig, compress_svdllm, relative_energy_scores
from rankdyna_trainer.targets import find_target_linears

from ...compression_checks import assert_budget_met, assert_reloads_identically, targeted_dense_params, task_dataloader
from ...conftest import tiny_bert, tiny_llama


def _assert_within_budget(modules, dense, budget, slack):
    """At most the budget; per-matrix rounding down (uniform allocation) leaves up to ``slack`` unused."""
    total = sum(exported_params(e) for e in modules.values())
    assert (1 - slack) * budget * dense <= total <= budget * dense


def _batches(n=8, length=16, seed=0):
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[: n // 2]}, {"input_ids": ids[n // 2 :]}]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_budget_met_and_reload(allocation, budget, tmp_path):
    model = tiny_llama()
    dense = targeted_dense_params(model)
    modules = compress_svdllm(model, SVDLLMConfig(target_budget=budget, allocation=allocation), _batches())
    if allocation == "global":
        assert_budget_met(modules, dense, budget)
    else:
        _assert_within_budget(modules, dense, budget, slack=0.1)
    assert_reloads_identically(model, modules, "svdllm", tmp_path)


def test_uniform_allocation_gives_every_matrix_its_own_share():
    model = tiny_llama()
    shapes = {n: tuple(l.weight.shape) for n, l in find_target_linears(model).items()}
    modules = compress_svdllm(model, SVDLLMConfig(target_budget=0.4), _batches())
    for name, (m, n) in shapes.items():
        assert modules[name]["type"] == "low_rank" and modules[name]["rank"] == uniform_rank(0.4, m, n)


def test_global_allocation_moves_rank_between_matrices_and_keeps_the_budget():
    model = tiny_llama()
    dense = targeted_dense_params(model)
    modules = compress_svdllm(model, SVDLLMConfig(target_budget=0.4, allocation="global"), _batches())
    kept = [exported_params(e) / (e["out_features"] * e["in_features"]) for e in modules.values()]
    assert max(kept) - min(kept) > 0.2  # not uniform
    assert sum(exported_params(e) for e in modules.values()) <= 0.4 * dense


@torch.no_grad()
def test_first_block_is_the_whitened_truncation_of_its_weights():
    """Block 0 sees the untouched embeddings, so its factors can be recomputed independently."""
    model, reference = tiny_llama(), tiny_llama()
    batches = _batches()
    compress_svdllm(model, SVDLLMConfig(target_budget=0.5, damping=1e-3), batches)
    names = [n for n in find_target_linears(reference) if n.startswith("model.layers.0.")]
    moments = input_statistics(reference, "model.layers.0", names, batches, "second_moment")
    for name in names:
        weight = reference.get_submodule(name).weight
        fact = whitened_factorization(weight, moments[name], 1e-3)
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        expected = fact.weight(torch.arange(fact.s.numel()) < uniform_rank(0.5, *weight.shape))
        torch.testing.assert_close(layer.weight @ layer.down.weight, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_full_budget_reproduces_the_model():
    model, reference = tiny_llama(), tiny_llama()
    compress_svdllm(model, SVDLLMConfig(target_budget=1.0), _batches())
    ids = _batches()[0]["input_ids"]
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_relative_energy_scores_fall_with_the_singular_values_and_with_the_cost():
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    scores = relative_energy_scores(s, 8, 8)
    torch.testing.assert_close(scores * 16, torch.tensor([16.0, 4.0, 1.0, 0.0]) / 21)
    assert bool((scores[:-1] > scores[1:]).all())
    assert float(relative_energy_scores(s, 16, 16)[0]) == pytest.approx(float(scores[0]) / 2)


def test_through_the_registry_on_an_encoder_with_labelled_batches(tmp_path):
    model = tiny_bert()
    method = get_method("svdllm")
    config = method.make_config(target_budget=0.4, max_calibration_batches=2)
    modules = method.compress(model, config, task_dataloader())
    _assert_within_budget(modules, targeted_dense_params(tiny_bert()), 0.4, slack=0.1)
    assert_reloads_identically(model, modules, "svdllm", tmp_path)


@pytest.mark.parametrize("kwargs,message", [
    ({"allocation": "per-layer"}, "allocation must be one of"),
    ({"damping": -1.0}, "damping must be a number >= 0"),
    ({"max_calibration_batches": 0}, "max_calibration_batches must be None or an integer >= 1"),
    ({"target_budget": 0.0}, "target_budget"),
])
def test_bad_config_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVDLLMConfig(**kwargs)


def test_missing_calibration_data_is_rejected():
    with pytest.raises(ValueError, match="needs calibration data"):
        compress_svdllm(tiny_llama(), SVDLLMConfig(), None)
    with pytest.raises(ValueError, match="no calibration batch"):
        compress_svdllm(tiny_llama(), SVDLLMConfig(), [])
