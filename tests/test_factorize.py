import pytest
import torch

from rankdyna_trainer.factorize import svd_factorization, whitened_factorization, whitening


def _correlated_inputs(tokens=512, features=16, seed=0):
    """Inputs with very different scales per direction, as LLM activations have (outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=g, dtype=torch.float64)
    scales = torch.logspace(-2, 1, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) @ (mixing * scales[:, None])


def _output_error(weight, approx, X):
    return ((weight.double() - approx.double()) @ X.T).pow(2).sum() / X.shape[0]


def test_whitening_factor_reproduces_the_damped_second_moment():
    X = _correlated_inputs()
    C = X.T @ X / X.shape[0]
    S, S_inv = whitening(C, damping=0.1)
    damped = C + 0.1 * C.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(S @ S.T, damped)
    torch.testing.assert_close(S @ S_inv, torch.eye(16, dtype=torch.float64))


def test_dropping_a_group_costs_exactly_its_squared_singular_value_in_output_error():
    X = _correlated_inputs()
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    fact = whitened_factorization(W, X.T @ X / X.shape[0], damping=0.0)
    torch.testing.assert_close(fact.weight().double(), W.double(), atol=1e-4, rtol=1e-4)
    assert bool((fact.s[:-1] >= fact.s[1:]).all())
    for rank in (3, 8):
        keep = torch.arange(12) < rank
        error = _output_error(W, fact.weight(keep), X)
        assert float(error) == pytest.approx(float(fact.s[~keep].double().pow(2).sum()), rel=1e-3)


def test_whitened_truncation_beats_plain_and_activation_weighted_svd_on_the_output_error():
    X = _correlated_inputs()
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    keep = torch.arange(12) < 4
    whitened = _output_error(W, whitened_factorization(W, X.T @ X / X.shape[0]).weight(keep), X)
    plain = _output_error(W, svd_factorization(W).weight(keep), X)
    weighted = _output_error(W, svd_factorization(W, X.pow(2).mean(0).sqrt().float()).weight(keep), X)
    assert whitened < weighted and whitened < plain


def test_singular_and_ill_conditioned_second_moments_stay_finite_and_exact_at_full_rank():
    # Fewer calibration tokens than input channels, one dead channel and one channel 1e6 times larger.
    X = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X[:, 4] = 0
    X[:, 7] *= 1e6
    W = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    for damping in (0.0, 1e-2):
        fact = whitened_factorization(W, X.T @ X / X.shape[0], damping)
        assert all(bool(torch.isfinite(t).all()) for t in (fact.left, fact.s, fact.right))
        torch.testing.assert_close(fact.weight(), W, atol=1e-3, rtol=1e-3)
    # No input energy at all: plain SVD.
    fact = whitened_factorization(W, torch.zeros(16, 16))
    torch.testing.assert_close(fact.s, torch.linalg.svdvals(W), atol=1e-5, rtol=1e-5)


def test_bad_second_moments_are_rejected():
    W = torch.randn(4, 3)
    with pytest.raises(ValueError, match="square"):
        whitened_factorization(W, torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 inputs"):
        whitened_factorization(W, torch.eye(5))
    with pytest.raises(ValueError, match="not finite"):
        whitened_factorization(W, torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="damping"):
        whitening(torch.eye(3), damping=-1.0)
