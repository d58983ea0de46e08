"""The kept-groups compute path: the same model as the gated all-groups path, at the kept groups' cost."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.methods.rankdyna import ChannelGatedLinear, SVDLinear, gated_layers
from rankdyna_trainer.methods.rankdyna.kept_compute import KEPT_PATH_MAX_FRACTION, KeptCompute
from rankdyna_trainer.methods.rankdyna.layer import (
    ChannelProducerConv1D,
    ChannelProducerLinear,
    HeadChannelGatedLinear,
    OutputGatedLinear,
)
from tests.conftest import random_classification_dataset, tiny_bert
from tests.tiny_models import ARCHITECTURES, example_inputs


def _prepared_with_random_masks(arch: str, seed: int = 0, attention_groups: str = "singular"):
    model = ARCHITECTURES[arch].build(seed)
    # factor_budget 0.25 leaves frozen groups beyond the trainable ones, so both factor parts are gathered.
    prepare_model(model, RankDynaConfig(target_budget=0.5, factor_budget=0.25, attention_groups=attention_groups))
    layers = list(gated_layers(model).values())
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(layers):
        keep = torch.rand(layer.gate.shape, generator=g) < 0.5
        if i == 0:
            keep[:] = True  # a layer that keeps everything stays on its plain path
        if i == 1:
            keep[:] = False  # rank 0
        layer.gate.copy_(keep.to(layer.gate.dtype))
    for module in model.modules():  # training mode (gate gradients) without dropout's randomness
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train(), layers


def _loss_and_grads(model, layers, inputs):
    model.zero_grad()
    for layer in layers:
        layer.gate_grad.zero_()
    out = model(**inputs)
    loss = out.logits.float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, [l.gate_grad.clone() for l in layers]


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_kept_path_gives_the_same_outputs_and_kept_gradients(arch):
    model, layers = _prepared_with_random_masks(arch)
    assert any(isinstance(l, ChannelGatedLinear) for l in layers) and any(isinstance(l, SVDLinear) for l in layers)
    producer_type = ChannelProducerConv1D if arch == "gpt2" else ChannelProducerLinear
    assert any(isinstance(m, producer_type) for m in model.modules())
    inputs = example_inputs(ARCHITECTURES[arch].task)
    kept = KeptCompute(model, layers)

    full_logits, full_grads, full_gate_grads = _loss_and_grads(model, layers, inputs)
    kept.use_kept(True)
    assert layers[0].kept_index is None and layers[2].kept_index is not None
    kept_logits, kept_grads, kept_gate_grads = _loss_and_grads(model, layers, inputs)

    torch.testing.assert_close(kept_logits, full_logits, rtol=1e-5, atol=1e-5)
    assert kept_grads.keys() == full_grads.keys()  # every parameter still gets a gradient (DDP buckets, FSDP)
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for layer, kept_grad, full_grad in zip(layers, kept_gate_grads, full_gate_grads):
        keep = layer.gate.bool()
        torch.testing.assert_close(kept_grad[keep], full_grad[keep], rtol=1e-4, atol=1e-6)
        assert not kept_grad[~keep].any()  # masked groups are not multiplied, so they get no gate gradient

    kept.clear()
    assert all(l.kept_index is None for l in layers)
    torch.testing.assert_close(_loss_and_grads(model, layers, inputs)[0], full_logits)


@pytest.mark.parametrize("arch, attention_groups", [("bert", "channels"), ("bert", "singular"), ("llama", "singular"),
                                                    ("gpt2", "singular")])
def test_a_step_that_does_not_score_skips_the_gates_and_changes_no_value(arch, attention_groups):
    """With ``gate_scored`` off (RankDynaCallback's unscored steps) every layer runs without its gate's gradient and
    without multiplying by ones: bit for bit the same logits and parameter gradients, on both paths."""
    model, layers = _prepared_with_random_masks(arch, attention_groups=attention_groups)
    inputs = example_inputs(ARCHITECTURES[arch].task)
    kept = KeptCompute(model, layers)
    for kept_only in (False, True):
        kept.use_kept(kept_only)
        kept.refresh()
        assert layers[0].all_groups_kept and not layers[1].all_groups_kept
        results = {}
        for scored in (True, False):
            for layer in layers:
                layer.gate_scored = scored
            results[scored] = _loss_and_grads(model, layers, inputs)
        (logits, grads, gate_grads), (plain_logits, plain_grads, plain_gate_grads) = results[True], results[False]
        assert torch.equal(plain_logits, logits)
        assert plain_grads.keys() == grads.keys() and all(torch.equal(plain_grads[n], grads[n]) for n in grads)
        assert any(g.any() for g in gate_grads) and not any(g.any() for g in plain_gate_grads)
    kept.clear()  # the gates are no longer refreshed here: every layer multiplies by its gate again
    assert not any(l.all_groups_kept for l in layers)
    if attention_groups == "channels":
        assert any(isinstance(l, HeadChannelGatedLinear) for l in layers)
        assert any(isinstance(l, OutputGatedLinear) for l in layers)


def test_a_layer_keeping_most_of_its_groups_stays_on_the_plain_path():
    model, layers = _prepared_with_random_masks("bert")
    kept = KeptCompute(model, layers)
    channel = next(l for l in layers[2:] if isinstance(l, ChannelGatedLinear))
    n = channel.gate.numel()
    for fraction, gathers in ((KEPT_PATH_MAX_FRACTION, True), (KEPT_PATH_MAX_FRACTION + 2 / n, False), (1.0, False)):
        channel.gate.zero_()
        channel.gate[:int(fraction * n)] = 1
        kept.refresh()
        kept.use_kept(True)
        assert (channel.kept_index is not None) == gathers, fraction
    # On the plain path the layer is the same model: masked groups are multiplied by their zero gate.
    inputs = example_inputs(ARCHITECTURES["bert"].task)
    on_kept_path = _loss_and_grads(model, layers, inputs)[0]
    kept.use_kept(False)
    torch.testing.assert_close(on_kept_path, _loss_and_grads(model, layers, inputs)[0], rtol=1e-5, atol=1e-5)


def test_refresh_follows_new_gates():
    model, layers = _prepared_with_random_masks("bert")
    kept = KeptCompute(model, layers)
    kept.use_kept(True)
    svd = next(l for l in layers[2:] if isinstance(l, SVDLinear))
    svd.gate.fill_(0)
    svd.gate[[1, svd.max_rank - 1]] = 1
    kept.refresh()
    trainable, frozen = svd.kept_index
    assert trainable.tolist() == [1] and frozen.tolist() == [svd.max_rank - 1 - svd.trainable_rank]


def test_masked_groups_keep_their_scores_on_kept_only_steps(tmp_path):
    """During pruning, only reallocation steps run (and score) every group; a masked group's Fisher score is left
    as it was on the other steps, and kept groups' scores move every step."""
    model = prepare_model(tiny_bert(), RankDynaConfig(target_budget=0.3, reallocation_interval=4,
                                                      warmup_fraction=0.1, final_fraction=0.2))
    config = model.rankdyna_config
    seen = []

    class Probe(RankDynaCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            before = [l.gate_fisher.clone() for l in self._layers]
            gates = [l.gate.clone() for l in self._layers]
            kept_only = any(l.kept_index is not None for l in self._layers)
            super().on_pre_optimizer_step(args, state, control, **kwargs)
            if self.budget.tracks_scores(state.global_step):
                after = [l.gate_fisher for l in self._layers]
                moved_masked = any(((a != b) & (g == 0)).any() for a, b, g in zip(after, before, gates))
                seen.append((state.global_step, kept_only, moved_masked, self.scores_masked_groups(state.global_step)))

    args = TrainingArguments(str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(),
            callbacks=[Probe(config)]).train()
    pruning = [row for row in seen if row[0] > 3]
    assert any(kept_only for _, kept_only, _, _ in pruning), "no step ran the kept groups only"
    for step, kept_only, moved_masked, scoring in pruning:
        if kept_only:
            assert not scoring and not moved_masked, step
    assert any(scoring and moved for _, _, moved, scoring in pruning), "masked groups were never scored"
    assert all(l.kept_index is None for l in gated_layers(model).values())  # plain path after training


def test_torch_compile_runs_the_kept_path():
    model, layers = _prepared_with_random_masks("llama")
    inputs = example_inputs("causal_lm")
    full = model(**inputs).logits.detach()
    KeptCompute(model, layers).use_kept(True)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits.detach(), full, rtol=1e-5, atol=1e-5)
