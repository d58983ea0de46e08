import numpy as np
import pytest
import torch

from rankdyna_trainer.factorize import fisher_information
from rankdyna_trainer.methods.fwsvd import fisher_weighted_factorization, row_weights
from rankdyna_trainer.methods.tfwsvd import TFWSVDConfig, compress_tfwsvd, weighted_error, weighted_low_rank
from rankdyna_trainer.methods.tfwsvd.model import _solve_rows
from rankdyna_trainer.targets import find_target_linears

from ...compression_checks import (
    assert_budget_met,
    assert_reloads_identically,
    targeted_dense_params,
    task_dataloader,
)
from ...conftest import tiny_bert


def test_row_solve_matches_per_row_weighted_least_squares():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, 8, generator=g, dtype=torch.float64)
    weights = torch.rand(5, 8, generator=g, dtype=torch.float64)
    basis = torch.randn(3, 8, generator=g, dtype=torch.float64)
    solved = _solve_rows(target, weights, basis, ridge=0.0, chunk=2)
    for i in range(5):  # brute force: sqrt-weighted ordinary least squares, one row at a time
        w = np.sqrt(weights[i].numpy())
        expected = np.linalg.lstsq((basis.numpy() * w).T, target[i].numpy() * w, rcond=None)[0]
        np.testing.assert_allclose(solved[i].numpy(), expected, rtol=1e-8, atol=1e-10)


def test_lowers_element_wise_objective_below_fwsvd():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 10, generator=g)
    F = torch.rand(12, 10, generator=g) ** 3  # uneven within rows: FWSVD's row weights cannot express it
    start = fisher_weighted_factorization(W, row_weights(F))
    left, right = start.factors(torch.arange(10) < 3)
    fw = weighted_error(W, left @ right, F)
    L, R = weighted_low_rank(W, F, left, right, iterations=10, ridge=0.0)
    assert weighted_error(W, L @ R, F) < 0.95 * fw


@pytest.mark.parametrize("budget", [0.5, 0.33])
def test_budget_met_reload_and_diagnostics(budget, tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    reference = tiny_bert()
    layers = find_target_linears(reference)
    fisher = fisher_information(reference, task_dataloader(), layers)
    modules = compress_tfwsvd(model, TFWSVDConfig(target_budget=budget, als_iterations=3), task_dataloader())
    assert_budget_met(modules, dense, budget)
    for name, entry in modules.items():
        risk = entry["diagnostics"]
        assert risk["svd_excess_error"] > 0 and risk["fisher_row_cv"] >= 0
        # the exported matrix is at least as good as FWSVD's on the element-wise objective
        W, F = layers[name].weight.detach(), fisher[name]
        fw = fisher_weighted_factorization(W, row_weights(F)).weight(torch.arange(min(W.shape)) < risk["rank"])
        layer = model.get_submodule(name)
        exported = layer.weight @ layer.down.weight
        assert weighted_error(W, exported, F) <= weighted_error(W, fw, F) * (1 + 1e-4)
    assert_reloads_identically(model, modules, "tfwsvd", tmp_path)
