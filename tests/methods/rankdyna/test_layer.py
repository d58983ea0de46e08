import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankdyna_trainer import RankDynaConfig, SVDLinear, prepare_model
from tests.conftest import tiny_bert


@pytest.mark.parametrize("tokens", [1, 4096])  # both forward paths (factorized / materialized weight)
def test_full_rank_reproduces_linear(tokens):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    layer = SVDLinear.from_linear(linear)
    x = torch.randn(tokens, 24)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def test_masked_groups_drop_out_of_the_product():
    torch.manual_seed(0)
    layer = SVDLinear.from_linear(nn.Linear(16, 12, bias=False))
    layer.gate[5:] = 0
    x = torch.randn(3, 16)
    expected = x @ (layer.U[:, :5] * layer.s[:5] @ layer.V[:5]).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_gate_gradient_is_singular_value_sensitivity_for_kept_and_re_entry_gain_for_masked():
    torch.manual_seed(0)
    layer = SVDLinear.from_linear(nn.Linear(10, 8)).train()
    layer.gate[3] = 0
    x = torch.randn(6, 10)
    layer(x).pow(2).sum().backward()
    # Reference: derivative of the loss with respect to each effective singular value s_i * gate_i.
    s_eff = (layer.s * layer.gate).detach().requires_grad_(True)
    out = torch.nn.functional.linear(x, (layer.U.detach() * s_eff) @ layer.V.detach(), layer.bias.detach())
    out.pow(2).sum().backward()
    expected = layer.s.detach() * s_eff.grad
    torch.testing.assert_close(layer.gate_grad, expected, atol=1e-4, rtol=1e-4)
    assert layer.gate_grad[3] != 0  # a masked group still gets a signal
    assert layer.s.grad[3] == 0  # ... while its parameters are untouched by this loss


def test_gate_gradient_accumulates_over_micro_batches():
    torch.manual_seed(0)
    layer = SVDLinear.from_linear(nn.Linear(10, 8)).train()
    x = torch.randn(8, 10)
    layer(x).sum().backward()
    full = layer.gate_grad.clone()
    layer.gate_grad.zero_()
    layer(x[:4]).sum().backward()
    layer(x[4:]).sum().backward()
    torch.testing.assert_close(layer.gate_grad, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("factor_budget", [None, 1.0])
def test_prepare_model_replaces_targets_and_keeps_outputs(factor_budget):
    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 12))
    before = model(ids).logits
    # full rank (trainable or partly frozen): exact
    prepare_model(model, RankDynaConfig(factor_budget=factor_budget, ffn_groups="singular",
                                        attention_groups="singular"))
    assert sum(isinstance(m, SVDLinear) for m in model.modules()) == 12
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="called once per model"):
        prepare_model(model, RankDynaConfig())


def test_init_rank_truncates_each_matrix():
    model = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular", init_rank=4))
    assert {m.max_rank for m in model.modules() if isinstance(m, SVDLinear)} == {4}


def _svd_layers(model):
    return [m for m in model.modules() if isinstance(m, SVDLinear)]


def test_factor_budget_bounds_the_trainable_factors_and_freezes_the_rest():
    model = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular", target_budget=0.3,
                                                      factor_budget=0.9))
    for layer in _svd_layers(model):
        m, n = layer.out_features, layer.in_features
        assert layer.max_rank == min(m, n)  # every group is still there...
        k = layer.trainable_rank
        assert k * (m + n) <= 0.9 * m * n < (k + 1) * (m + n)  # ... but only 90% of the dense size trains
        assert layer.U.shape == (m, k) and layer.V.shape == (k, n)
        assert layer.U_frozen.shape == (m, min(m, n) - k) and not layer.U_frozen.requires_grad
    half = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular", target_budget=0.3,
                                                     factor_budget=0.5, init_rank=5))
    assert {l.max_rank for l in _svd_layers(half)} == {5}
    wide = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular", factor_budget=2.0))
    assert all(l.trainable_rank == l.max_rank == min(l.out_features, l.in_features) for l in _svd_layers(wide))


def test_dropped_untrained_groups_truncate_the_start():
    model = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular", target_budget=0.3,
                                                      factor_budget=1.0, untrained_groups="dropped"))
    for layer in _svd_layers(model):
        m, n = layer.out_features, layer.in_features
        assert layer.max_rank == layer.trainable_rank == m * n // (m + n)
        assert not hasattr(layer, "U_frozen")


def test_frozen_groups_get_no_gradient_but_are_scored_and_pruned():
    torch.manual_seed(0)
    layer = SVDLinear.from_linear(nn.Linear(12, 10), trainable_rank=4).train()
    dense = layer.effective_weight().detach().clone()
    x = torch.randn(6, 12)
    layer(x).pow(2).sum().backward()
    assert layer.U.grad.shape == (10, 4) and layer.V.grad.shape == (4, 12)
    assert layer.s.grad.shape == (10,) and bool((layer.gate_grad[4:] != 0).all())  # frozen groups are scored
    # Both forward paths (low rank and dense) agree and give the full-rank weight's output.
    torch.testing.assert_close(layer(x), F.linear(x, dense, layer.bias))
    torch.testing.assert_close(layer(torch.randn(500, 12)).shape, torch.Size([500, 10]))
    layer.gate[6:] = 0  # prune frozen groups: the weight follows
    kept = (layer.left()[:, :6] * layer.s[:6]) @ layer.right()[:6]
    torch.testing.assert_close(layer.effective_weight(), kept)
