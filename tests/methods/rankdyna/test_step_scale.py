"""The mechanism behind issue #9: plain factorized Adam steps move the weight several times as far as a dense step."""

import pytest
import torch
from torch import nn

from rankdyna_trainer.experiment.glue_metrics import constant_prediction_floor, prediction_spread
from rankdyna_trainer.methods.rankdyna import SVDLinear
from rankdyna_trainer.methods.rankdyna.model import pruned_away


def _weight_moved_by_adam_steps(layer: nn.Module, steps: int = 5, lr: float = 1e-3) -> float:
    torch.manual_seed(1)
    x, target = torch.randn(256, layer_in(layer)), torch.randn(256, layer_out(layer))
    before = _weight(layer).detach().clone()
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        optimizer.step()
    return float((_weight(layer).detach() - before).norm())


def layer_in(layer):
    return layer.in_features


def layer_out(layer):
    return layer.out_features


def _weight(layer):
    return layer.effective_weight() if isinstance(layer, SVDLinear) else layer.weight


def _pretrained_like_linear(m: int = 96, n: int = 48) -> nn.Linear:
    # A spectrum like MiniLM's (a few singular values of 3-6, most near 1): ||W||_F / sqrt(n) is well above 1.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.linspace(6.0, 0.5, n)
    linear = nn.Linear(n, m)
    with torch.no_grad():
        linear.weight.copy_(U * s @ V.T)
    return linear


def test_plain_factorized_steps_move_the_weight_several_times_as_far_as_dense_steps():
    dense = _pretrained_like_linear()
    dense_move = _weight_moved_by_adam_steps(dense)
    plain = _weight_moved_by_adam_steps(SVDLinear.from_linear(_pretrained_like_linear(), factor_scaling="none"))
    assert plain > 2.0 * dense_move  # the collapse mechanism, reproduced


@pytest.mark.parametrize("scaling", ["matrix", "group"])
def test_scaled_factor_steps_move_the_weight_about_as_far_as_dense_steps(scaling):
    dense_move = _weight_moved_by_adam_steps(_pretrained_like_linear())
    scaled = _weight_moved_by_adam_steps(SVDLinear.from_linear(_pretrained_like_linear(), factor_scaling=scaling))
    assert 0.4 * dense_move < scaled < 1.6 * dense_move


@pytest.mark.parametrize("scaling", ["none", "matrix", "group"])
def test_factor_scaling_leaves_the_function_and_the_factors_unchanged(scaling):
    linear = _pretrained_like_linear()
    layer = SVDLinear.from_linear(linear, factor_scaling=scaling)
    x = torch.randn(7, linear.in_features)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.left().T @ layer.left(), torch.eye(layer.max_rank), atol=1e-4, rtol=0)


def test_unknown_factor_scaling_is_refused():
    with pytest.raises(ValueError, match="factor_scaling must be one of"):
        SVDLinear.from_linear(_pretrained_like_linear(), factor_scaling="dense")


def test_zero_rank_blocks_are_found():
    ranks = {"l1.attention.self.query": 0, "l1.attention.self.key": 0, "l1.attention.self.value": 0,
             "l1.attention.output.dense": 3, "l2.attention.self.query": 0, "l2.attention.self.key": 4}
    zero, blocks = pruned_away(ranks)
    assert set(zero) == {"l1.attention.self.query", "l1.attention.self.key", "l1.attention.self.value",
                         "l2.attention.self.query"}
    assert blocks == ["l1.attention.self"]


def test_constant_prediction_floor_and_spread_flag_a_constant_model():
    references = [0] * 146 + [1] * 131  # RTE dev's label counts
    floor = constant_prediction_floor("rte", references)
    assert floor["accuracy"] == pytest.approx(146 / 277)
    assert prediction_spread("rte", [1] * 277)["distinct"] == 1
    assert constant_prediction_floor("mrpc", [1] * 279 + [0] * 129)["f1"] > 0.8
