import pytest
import torch

from rankdyna_trainer.export import LowRankLinear
from rankdyna_trainer.methods.svd import SVDConfig, compress_svd
from rankdyna_trainer.targets import find_target_linears

from ...compression_checks import assert_budget_met, assert_reloads_identically, targeted_dense_params
from ...conftest import tiny_bert


@pytest.mark.parametrize("budget", [0.5, 0.33])
def test_budget_met_with_uniform_rank_and_reload(budget, tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    modules = compress_svd(model, SVDConfig(target_budget=budget))
    assert_budget_met(modules, dense, budget)
    ranks = [e["rank"] for e in modules.values() if e["type"] == "low_rank"]
    assert len(ranks) == len(modules) and max(ranks) - min(ranks) <= 1
    assert_reloads_identically(model, modules, "svd", tmp_path)


def test_each_layer_is_the_truncated_svd_of_its_weight():
    model = tiny_bert()
    weights = {n: l.weight.detach().clone() for n, l in find_target_linears(model).items()}
    compress_svd(model, SVDConfig(target_budget=0.5))
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        U, s, Vh = torch.linalg.svd(weight.double())
        r = layer.rank
        expected = (U[:, :r] * s[:r]) @ Vh[:r]
        torch.testing.assert_close((layer.weight @ layer.down.weight).double(), expected, atol=1e-5, rtol=1e-4)


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="target_budget"):
        SVDConfig(target_budget=1.5)
