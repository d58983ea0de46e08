import pytest
import torch
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


def test_prepare_model_replaces_targets_and_keeps_outputs():
    model = tiny_bert()
    ids = torch.randint(0, 128, (2, 12))
    before = model(ids).logits
    prepare_model(model, RankDynaConfig(factor_budget=None))  # full rank: exact
    assert sum(isinstance(m, SVDLinear) for m in model.modules()) == 12
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="called once per model"):
        prepare_model(model, RankDynaConfig())


def test_init_rank_truncates_each_matrix():
    model = prepare_model(tiny_bert(), RankDynaConfig(init_rank=4))
    assert {m.max_rank for m in model.modules() if isinstance(m, SVDLinear)} == {4}


def test_factor_budget_bounds_the_factors_by_default():
    model = prepare_model(tiny_bert(), RankDynaConfig(target_budget=0.3))
    for layer in (m for m in model.modules() if isinstance(m, SVDLinear)):
        m, n = layer.out_features, layer.in_features
        assert layer.max_rank == int(0.9 * m * n) // (m + n)  # factors within 90% of the dense matrix
        assert layer.max_rank * (m + n) <= 0.9 * m * n < (layer.max_rank + 1) * (m + n)
    break_even = prepare_model(tiny_bert(), RankDynaConfig(target_budget=0.3, factor_budget=1.0))
    assert all(l.max_rank == l.out_features * l.in_features // (l.out_features + l.in_features)
               for l in break_even.modules() if isinstance(l, SVDLinear))
    half = prepare_model(tiny_bert(), RankDynaConfig(target_budget=0.3, factor_budget=0.5, init_rank=5))
    assert {l.max_rank for l in half.modules() if isinstance(l, SVDLinear)} == {5}
    wide = prepare_model(tiny_bert(), RankDynaConfig(factor_budget=2.0))
    assert all(l.max_rank == min(l.out_features, l.in_features) for l in wide.modules() if isinstance(l, SVDLinear))
