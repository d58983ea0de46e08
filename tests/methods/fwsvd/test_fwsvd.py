import numpy as np
import pytest
import torch

from rankdyna_trainer.factorize import fisher_information
from rankdyna_trainer.methods.fwsvd import (
    FWSVDConfig,
    compress_fwsvd,
    fisher_weighted_factorization,
    row_weighted_error,
    row_weights,
)
from rankdyna_trainer.targets import find_target_linears

from ...compression_checks import (
    assert_budget_met,
    assert_reloads_identically,
    targeted_dense_params,
    task_dataloader,
)
from ...conftest import tiny_bert


def brute_force_row_weighted(W: np.ndarray, d: np.ndarray, rank: int, sweeps: int = 400) -> float:
    """min over rank-``rank`` X of ||diag(d)(W - X)||^2 by alternating least squares, one row/column at a time."""
    rng = np.random.default_rng(0)
    m, n = W.shape
    L, R = rng.standard_normal((m, rank)), rng.standard_normal((rank, n))
    for _ in range(sweeps):
        for i in range(m):  # a row weight scales the whole row: plain least squares per row
            L[i] = np.linalg.lstsq(R.T, W[i], rcond=None)[0]
        for j in range(n):
            R[:, j] = np.linalg.lstsq(d[:, None] * L, d * W[:, j], rcond=None)[0]
    return float((((W - L @ R) * d[:, None]) ** 2).sum())


def test_closed_form_matches_brute_force_weighted_least_squares():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 7, generator=g, dtype=torch.float64)
    d = torch.rand(9, generator=g, dtype=torch.float64) * 3 + 0.1
    fact = fisher_weighted_factorization(W, d)
    for rank in (1, 3):
        keep = torch.arange(7) < rank
        closed = float(row_weighted_error(W, fact.weight(keep).double(), d))
        assert closed == pytest.approx(brute_force_row_weighted(W.numpy(), d.numpy(), rank), rel=1e-6)


def test_equal_row_weights_give_plain_svd():
    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    fact = fisher_weighted_factorization(W, torch.full((6,), 2.0))
    U, s, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(fact.weight(torch.arange(5) < 2), (U[:, :2] * s[:2]) @ Vh[:2], atol=1e-5, rtol=1e-5)


def test_fisher_is_the_sum_of_squared_batch_gradients():
    model = tiny_bert()
    layers = dict(list(find_target_linears(model).items())[:2])
    loader = task_dataloader(n=32, batch_size=16)
    fisher = fisher_information(model, loader, layers)
    assert all(p.grad is None for p in model.parameters())
    expected = {n: torch.zeros_like(l.weight) for n, l in layers.items()}
    model.eval()
    for batch in loader:  # plain loop reference
        model.zero_grad()
        model(**batch).loss.backward()
        for n, l in layers.items():
            expected[n] += l.weight.grad ** 2
    for n in layers:
        torch.testing.assert_close(fisher[n], expected[n])


@pytest.mark.parametrize("budget", [0.5, 0.33])
def test_budget_met_and_reload(budget, tmp_path):
    model = tiny_bert()
    dense = targeted_dense_params(model)
    modules = compress_fwsvd(model, FWSVDConfig(target_budget=budget), task_dataloader())
    assert_budget_met(modules, dense, budget)
    assert_reloads_identically(model, modules, "fwsvd", tmp_path)


def test_fwsvd_beats_svd_on_the_row_weighted_objective():
    model = tiny_bert()
    layers = find_target_linears(model)
    fisher = fisher_information(model, task_dataloader(), layers)
    for name, linear in layers.items():
        d = row_weights(fisher[name])
        keep = torch.arange(min(linear.weight.shape)) < 4
        U, s, Vh = torch.linalg.svd(linear.weight.detach())
        svd_error = row_weighted_error(linear.weight, (U[:, :4] * s[:4]) @ Vh[:4], d)
        fw_error = row_weighted_error(linear.weight, fisher_weighted_factorization(linear.weight, d).weight(keep), d)
        assert fw_error <= svd_error * (1 + 1e-5)
