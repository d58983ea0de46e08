import pytest
import torch

from rankdyna_trainer.methods.ars import ARSConfig, alignment_penalty, budget_penalty, compress_ars
from rankdyna_trainer.methods.ars.layer import gumbel_sigmoid_straight_through

from ...compression_checks import (
    assert_budget_met,
    assert_reloads_identically,
    targeted_dense_params,
    task_dataloader,
)
from ...conftest import tiny_bert


def test_alignment_penalty_counts_every_rise_down_the_spectrum():
    probs = [torch.tensor([0.9, 0.5, 0.7, 0.2, 0.6]), torch.tensor([1.0, 0.8, 0.1])]
    expected = []
    for p in probs:  # plain loop reference
        expected.append(sum(max(float(p[i + 1] - p[i]), 0.0) for i in range(len(p) - 1)))
    assert float(alignment_penalty(probs)) == pytest.approx(sum(expected) / len(expected))


def test_budget_penalty_is_relative_squared_overshoot():
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0])]
    shapes = [(4, 3), (2, 5)]
    cost = 2 * (4 + 3) + 1 * (2 + 5)
    assert float(budget_penalty(masks, shapes, 10)) == pytest.approx((cost / 10 - 1) ** 2)


def test_straight_through_sample_is_binary_with_soft_gradient():
    logits = torch.zeros(1000, requires_grad=True)
    mask = gumbel_sigmoid_straight_through(logits, 0.5)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert (logits.grad >= 0).all() and (logits.grad > 0).float().mean() > 0.9


@pytest.mark.parametrize("budget", [0.5, 0.33])
def test_budget_met_and_reload(budget, tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    config = ARSConfig(target_budget=budget, mask_steps=6, hidden_size=8)
    modules = compress_ars(model, config, task_dataloader())
    assert_budget_met(modules, dense, budget)
    assert all(p.requires_grad for p in model.parameters())
    assert_reloads_identically(model, modules, "ars", tmp_path)


def test_bad_factorization_is_rejected():
    with pytest.raises(ValueError, match="factorization"):
        ARSConfig(factorization="qr")
