import pytest
import torch
from torch import nn

from rankdyna_trainer import SingularGroupScores, SVDLinear


def _layers_with_grads(seed: int, masked_group: int | None = None):
    torch.manual_seed(seed)
    layers = [SVDLinear.from_linear(nn.Linear(6, 5)).train(), SVDLinear.from_linear(nn.Linear(5, 7)).train()]
    if masked_group is not None:
        for layer in layers:
            layer.gate[masked_group] = 0
    x = torch.randn(4, 6)
    layers[1](torch.tanh(layers[0](x))).pow(2).mean().backward()
    return layers


def _reference_step(state, layer, beta1, beta2):
    """Element-wise AdaLoRA update written out with explicit tensors per part."""
    instant = {"U": (layer.U * layer.U.grad).abs(), "V": (layer.V * layer.V.grad).abs(),
               "gate": layer.gate_grad.abs()}
    for part, value in instant.items():
        sens, unc = state.get(part, (torch.zeros_like(value), torch.zeros_like(value)))
        sens = beta1 * sens + (1 - beta1) * value
        unc = beta2 * unc + (1 - beta2) * (value - sens).abs()
        state[part] = (sens, unc)
    score = {p: s * u for p, (s, u) in state.items()}
    return score["gate"] + score["U"].mean(0) + score["V"].mean(1)


def test_scores_follow_smoothed_sensitivity_times_uncertainty():
    layers = _layers_with_grads(0)
    scores = SingularGroupScores(layers, beta1=0.7, beta2=0.6)
    reference_state = [{}, {}]
    for _ in range(3):
        scores.update()
        expected = [_reference_step(st, l, 0.7, 0.6) for st, l in zip(reference_state, layers)]
    for got, want in zip(scores.group_scores(), expected):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
        assert got.shape == (5,)


def test_non_finite_step_leaves_scores_unchanged():
    layers = _layers_with_grads(1)
    scores = SingularGroupScores(layers)
    scores.update()
    before = [s.clone() for s in scores.group_scores()]
    layers[0].U.grad[0, 0] = float("nan")
    layers[1].gate_grad[2] = float("inf")
    scores.update()
    for got, want in zip(scores.group_scores(), before):
        torch.testing.assert_close(got, want)
    assert scores.skipped_steps == 1


def test_loss_scale_divides_gate_gradients_only():
    unscaled, scaled = _layers_with_grads(2), _layers_with_grads(2)
    for layer in scaled:
        layer.gate_grad *= 1024.0  # fp16 loss scaling reaches the gate hook; parameters are unscaled by accelerate
    a, b = SingularGroupScores(unscaled), SingularGroupScores(scaled)
    a.update()
    b.update(grad_scale=torch.tensor(1024.0))
    for x, y in zip(a.group_scores(), b.group_scores()):
        torch.testing.assert_close(x, y)


def test_needs_layers():
    with pytest.raises(ValueError, match="at least one SVDLinear"):
        SingularGroupScores([])


def test_adalora_signal_scores_masked_groups_by_their_vectors_only():
    layers = _layers_with_grads(3, masked_group=1)
    gate_signal = SingularGroupScores(layers, singular_value_signal="gate")
    adalora_signal = SingularGroupScores(layers, singular_value_signal="singular_value")
    # Each instance updates the same buffers; read the AdaLoRA variant's gate term straight after its update.
    adalora_signal.update()
    expected = [(l.s * l.s.grad).abs() * (1 - 0.85) for l in layers]
    for layer, want in zip(layers, expected):
        torch.testing.assert_close(layer.sensitivity_gate, want)
        assert layer.sensitivity_gate[1] == 0  # AdaLoRA's term is blind to a masked group
    for layer in layers:
        for name, buffer in layer.named_buffers():
            if name.startswith(("sensitivity_", "uncertainty_")):
                buffer.zero_()
    gate_signal.update()
    for layer in layers:
        torch.testing.assert_close(layer.sensitivity_gate, layer.gate_grad.abs() * (1 - 0.85))
        assert layer.sensitivity_gate[1] > 0  # the masked group keeps a signal only with the gate variant


def test_unknown_singular_value_signal_is_refused():
    with pytest.raises(ValueError, match="singular_value_signal must be one of"):
        SingularGroupScores(_layers_with_grads(0), singular_value_signal="hessian")


def test_fisher_importance_is_the_smoothed_squared_gate_gradient_and_skips_non_finite_steps():
    from rankdyna_trainer.methods.rankdyna import SingularGroupScores, SVDLinear

    torch.manual_seed(0)
    layer = SVDLinear.from_linear(torch.nn.Linear(6, 5), element_statistics=False)
    assert not hasattr(layer, "sensitivity_U")  # no element-wise state: the fisher score does not need it
    scores = SingularGroupScores([layer], beta1=0.5, importance="fisher")
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    grad = layer.gate_grad.clone()
    assert scores.update()
    torch.testing.assert_close(layer.gate_fisher, 0.5 * grad ** 2)
    layer.gate_grad[0] = float("nan")
    assert not scores.update() and scores.skipped_steps == 1
    torch.testing.assert_close(scores.group_scores()[0], 0.5 * grad ** 2)
