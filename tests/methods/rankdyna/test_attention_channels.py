"""RankDyna with attention channels as groups (attention_groups='channels'): the exact per-head rotation, the q/k and
v/o channel gates, the shared budget with FFN channels, export, save and fresh-process reload, and the refusals."""

import dataclasses
import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import GatheredLinear, ScatteredLinear, build_module, exported_params
from rankdyna_trainer.methods.rankdyna import SVDLinear, gated_layers
from rankdyna_trainer.methods.rankdyna.attention import pair_transforms
from rankdyna_trainer.methods.rankdyna.distillation import dense_teacher
from rankdyna_trainer.methods.rankdyna.kept_compute import KeptCompute
from rankdyna_trainer.methods.rankdyna.layer import (
    HeadChannelGatedLinear,
    OutputGatedLinear,
    ScatteringProducerLinear,
)
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import random_classification_dataset, tiny_bert, tiny_llama
from tests.round_trip import reload_in_fresh_process, save_for_reload, single_thread
from tests.tiny_models import ARCHITECTURES

CHANNELS = dict(attention_groups="channels")
LAYER0 = "bert.encoder.layer.0.attention"


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def _probe(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_pair_transforms_keep_the_bilinear_form_and_order_its_dims():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 32, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64)
    t_a, t_b = pair_transforms(a, b)
    torch.testing.assert_close(t_a.T @ t_b, torch.eye(8, dtype=torch.float64))
    a2, b2 = t_a @ a, t_b @ b
    torch.testing.assert_close(a2.T @ b2, a.T @ b)
    sigma = torch.linalg.svdvals(a.T @ b)[:8]
    # Rows are the singular directions of a^T b scaled by sqrt(sigma), largest first.
    torch.testing.assert_close(a2 @ a2.T, torch.diag(sigma))
    torch.testing.assert_close(b2 @ b2.T, torch.diag(sigma))


def test_pair_transforms_survive_a_singular_head():
    a = torch.randn(4, 16, dtype=torch.float64)
    a[3] = a[2]  # rank 3
    t_a, t_b = pair_transforms(a, torch.randn(4, 16, dtype=torch.float64))
    assert torch.isfinite(t_a).all() and torch.isfinite(t_b).all()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_rotation_leaves_the_tiny_bert_unchanged(attn_implementation):
    model = tiny_bert()
    model.config._attn_implementation = attn_implementation
    probe = _probe()
    with torch.no_grad():
        before = model.bert(input_ids=probe).last_hidden_state
    prepare_model(model, RankDynaConfig(**CHANNELS))
    layers = gated_layers(model)
    assert isinstance(layers[f"{LAYER0}.self.query"], OutputGatedLinear)
    assert isinstance(layers[f"{LAYER0}.output.dense"], HeadChannelGatedLinear)
    assert layers[f"{LAYER0}.self.query"].producers == [f"{LAYER0}.self.key"]
    assert layers[f"{LAYER0}.output.dense"].producers == [f"{LAYER0}.self.value"]
    assert not any(isinstance(l, SVDLinear) for l in layers.values())  # FFNs: channels (the 'auto' default)
    # A channel costs 2 x hidden weights; the layers together stand for the targeted dense weights.
    assert {l.group_cost for l in layers.values()} == {2 * 32}
    dense = sum(l.weight.numel() for l in find_target_linears(tiny_bert()).values())
    assert sum(l.full_cost for l in layers.values()) == dense
    with torch.no_grad():
        after = model.bert(input_ids=probe).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_rotation_leaves_the_packaged_minilm_unchanged():
    from transformers import AutoModelForSequenceClassification

    from rankdyna_trainer.packaged_models import minilm_path

    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    probe = torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=probe, output_hidden_states=True)
    prepare_model(model, RankDynaConfig(**CHANNELS))
    with torch.no_grad():
        after = model(input_ids=probe, output_hidden_states=True)
    torch.testing.assert_close(after.hidden_states[-1], before.hidden_states[-1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=0)
    query = model.bert.encoder.layer[0].attention.self.query
    norms = query.weight[:32].norm(dim=1)  # head 0: dims ordered by the singular values of W_q^T W_k
    assert bool((norms[:-1] >= norms[1:] - 1e-4).all())


def test_gates_remove_a_query_key_dim_and_a_value_dim():
    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS))
    attention = model.bert.encoder.layer[0].attention
    query, key, value, output = attention.self.query, attention.self.key, attention.self.value, attention.output.dense
    x = torch.randn(2, 5, 32)
    query.gate[3] = 0
    expected_q = torch.nn.functional.linear(x, query.weight, query.bias)
    expected_q[..., 3] = 0
    with torch.no_grad():
        torch.testing.assert_close(query(x), expected_q)
        # v/o: the output layer's gate on column j is the value's dim j removed (attention mixes tokens per dim).
        output.gate[17] = 0
        context = torch.randn(2, 5, 32)
        removed = context.clone()
        removed[..., 17] = 0
        torch.testing.assert_close(output(context), torch.nn.functional.linear(removed, output.weight, output.bias))
    assert key.weight.shape == value.weight.shape == (32, 32)  # the producers stay plain layers


def test_query_gate_gradient_is_the_loss_change_of_each_channel():
    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS))
    query = model.bert.encoder.layer[0].attention.self.query.train()
    x = torch.randn(3, 4, 32)
    query(x).square().sum().backward()
    q = torch.nn.functional.linear(x, query.weight, query.bias).detach()
    torch.testing.assert_close(query.gate_grad, (q * 2 * q).sum(dim=(0, 1)))


def _mask_heads(model) -> None:
    """Layer 0: head 0 keeps no q/k dim (uniform attention), head 1 no v dim; a few single dims elsewhere."""
    layers = gated_layers(model)
    query, output = layers[f"{LAYER0}.self.query"], layers[f"{LAYER0}.output.dense"]
    query.gate[:16] = 0
    query.gate[20] = 0
    output.gate[16:] = 0
    output.gate[5] = 0
    layers["bert.encoder.layer.1.attention.self.query"].gate[[1, 30]] = 0
    layers["bert.encoder.layer.1.output.dense"].gate[0] = 0


def test_export_keeps_the_outputs_even_for_heads_with_nothing_kept(tmp_path):
    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS))
    _mask_heads(model)
    probe = _probe()
    with torch.no_grad():
        masked = model(input_ids=probe).logits
    modules = export_model(model)
    attention = model.bert.encoder.layer[0].attention
    assert isinstance(attention.self.query, ScatteredLinear) and attention.self.query.weight.shape == (15, 32)
    assert isinstance(attention.self.key, ScatteredLinear) and attention.self.key.weight.shape == (15, 32)
    assert isinstance(attention.self.value, ScatteredLinear) and attention.self.value.weight.shape == (15, 32)
    assert isinstance(attention.output.dense, GatheredLinear) and attention.output.dense.weight.shape == (32, 15)
    assert modules[f"{LAYER0}.self.query"]["index"] == list(range(16, 20)) + list(range(21, 32))
    for eager_or_sdpa in ("eager", "sdpa"):
        model.config._attn_implementation = eager_or_sdpa
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=probe).logits, masked, atol=1e-5, rtol=0)
    # Each kept q/k channel costs its query and key rows, each v/o channel its value row and output column.
    kept = 2 * 32 * (15 + 15 + 30 + 31) + 2 * 2 * 32 * 64  # + the FFNs, whole
    assert sum(exported_params(e) for e in modules.values()) == kept


def test_short_run_meets_the_budget_with_attention_channels_competing_and_reloads(tmp_path):
    model = tiny_bert()
    dense = sum(l.weight.numel() for l in find_target_linears(model).values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (32, 12), generator=g)
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] >= 64).long().tolist()})
    config = RankDynaConfig(target_budget=0.4, reallocation_interval=1, **CHANNELS)
    prepare_model(model, config)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=5)
    # A callback given the default config trains what prepare_model built, and records it.
    callback = RankDynaCallback(dataclasses.replace(config, attention_groups="singular"))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert model.rankdyna_config.attention_groups == "channels"
    pattern = json.loads((tmp_path / "run" / "rank_pattern.json").read_text())
    assert pattern["params"] <= 0.4 * dense and pattern["dense_params"] == dense
    ranks = pattern["ranks"]
    attention = {n: r for n, r in ranks.items() if ".attention." in n}
    assert sorted(attention) == sorted(f"bert.encoder.layer.{i}.attention.{p}" for i in range(2)
                                       for p in ("self.query", "output.dense"))
    # One allocation over attention and FFN channels: both kinds lose some and keep some.
    assert 0 < sum(attention.values()) < 4 * 32, ranks
    ffn = [r for n, r in ranks.items() if ".attention." not in n]
    assert 0 < sum(ffn) < 2 * 64, ranks

    model.eval()
    manifest = {"trained": save_for_reload(model.eval(), tmp_path / "trained", "classification",
                                           "AutoModelForSequenceClassification", export_model(model))}
    assert sum(exported_params(e) for e in model.config.quantization_config.modules.values()) == pattern["params"]
    assert model.config.quantization_config.method_config["attention_groups"] == "channels"
    masked = prepare_model(tiny_bert(seed=1), RankDynaConfig(**CHANNELS))
    _mask_heads(masked)
    manifest["empty_heads"] = save_for_reload(masked, tmp_path / "empty_heads", "classification",
                                              "AutoModelForSequenceClassification", export_model(masked))
    results = reload_in_fresh_process(manifest, tmp_path)
    for case, result in results["cases"].items():
        assert result["loaded"], (case, result)
        assert result["max_abs_diff"] < 1e-5 and result["same_shape"], (case, result)
        assert not result["missing"] and not result["unexpected"] and not result["mismatched"], (case, result)
    assert {"GatheredLinear", "ScatteredLinear"} <= set(results["cases"]["empty_heads"]["module_types"])


def _kept_compute_model():
    """Float64 tiny BERT in training mode without dropout. Layer 0: head 0 keeps no q/k channel, head 1 all but one;
    three v/o channels (of both heads) and an FFN channel masked. Layer 1: no q/k channel kept, every v/o channel kept
    (the plain path)."""
    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS)).double()
    layers = gated_layers(model)
    layers[f"{LAYER0}.self.query"].gate[:16] = 0
    layers[f"{LAYER0}.self.query"].gate[20] = 0
    layers[f"{LAYER0}.output.dense"].gate[[5, 17, 30]] = 0
    layers["bert.encoder.layer.0.output.dense"].gate[5] = 0
    layers["bert.encoder.layer.1.attention.self.query"].gate.zero_()
    layers["bert.encoder.layer.1.attention.output.dense"].gate.fill_(1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train(), list(layers.values())


def _step(model, layers, inputs):
    model.zero_grad()
    for layer in layers:
        layer.gate_grad.zero_()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads, [l.gate_grad.clone() for l in layers]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_kept_path_of_the_attention_equals_its_gated_path(attn_implementation):
    model, layers = _kept_compute_model()
    model.config._attn_implementation = attn_implementation
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0
    inputs = dict(input_ids=_probe(), attention_mask=attention_mask, labels=torch.tensor([0, 1]))
    full_logits, full_loss, full_grads, full_gate_grads = _step(model, layers, inputs)

    kept = KeptCompute(model, layers, max_kept_fraction=1.0)  # every partly kept layer gathers, however much it keeps
    kept.use_kept(True)
    names = {layer: name for name, layer in gated_layers(model).items()}
    by_name = {name: layer for layer, name in names.items()}
    block0 = model.bert.encoder.layer[0].attention
    query, output = by_name[f"{LAYER0}.self.query"], by_name[f"{LAYER0}.output.dense"]
    assert isinstance(block0.self.key, ScatteringProducerLinear) and isinstance(block0.self.value,
                                                                                ScatteringProducerLinear)
    assert query.kept_index.tolist() == list(range(16, 20)) + list(range(21, 32))
    assert block0.self.key.kept_index is query.kept_index
    assert output.kept_index.tolist() == [j for j in range(32) if j not in (5, 17, 30)]
    assert block0.self.value.kept_index is output.kept_index
    block1 = model.bert.encoder.layer[1].attention
    assert block1.self.query.kept_index.numel() == 0 and block1.self.key.kept_index.numel() == 0  # nothing kept
    assert block1.output.dense.kept_index is None and block1.self.value.kept_index is None  # all kept: plain path
    kept_logits, kept_loss, kept_grads, kept_gate_grads = _step(model, layers, inputs)

    torch.testing.assert_close(kept_logits, full_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-10, atol=1e-12)
    assert kept_grads.keys() == full_grads.keys()  # every parameter still gets a gradient (DDP buckets, FSDP)
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    # The masked channels' rows of query and key, value rows and output columns get a zero gradient, as gated.
    for part, index in (("self.query.weight", slice(0, 16)), ("self.key.bias", 20), ("self.value.weight", 17)):
        assert not kept_grads[f"{LAYER0}.{part}"][index].any(), part
        assert kept_grads[f"{LAYER0}.{part}"][21:].any(), part
    assert not kept_grads[f"{LAYER0}.output.dense.weight"][:, [5, 17, 30]].any()
    for layer, kept_grad, full_grad in zip(layers, kept_gate_grads, full_gate_grads):
        keep = layer.gate.bool()
        torch.testing.assert_close(kept_grad[keep], full_grad[keep], rtol=1e-9, atol=1e-12, msg=names[layer])
        assert not kept_grad[~keep].any(), names[layer]  # masked channels are not multiplied: no gate gradient
    assert full_gate_grads[layers.index(query)][~query.gate.bool()].any()  # the gated path scores them
    assert kept_gate_grads[layers.index(query)][query.gate.bool()].all()
    assert kept_gate_grads[layers.index(output)][output.gate.bool()].all()

    kept.clear()
    assert all(l.kept_index is None for l in layers) and block0.self.key.kept_index is None
    torch.testing.assert_close(_step(model, layers, inputs)[0], full_logits)


def test_kept_path_multiplies_only_the_kept_attention_channels():
    """Counted, not timed: each attention projection's matmul is narrower by its masked channels."""
    from torch.utils.flop_counter import FlopCounterMode

    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS)).train()
    _mask_heads(model)  # q/k: 15 and 30 of 32 kept; v/o: 15 and 31 of 32 kept; FFNs whole
    layers = list(gated_layers(model).values())
    probe = _probe()

    def flops(kept_only: bool) -> int:
        kept = KeptCompute(model, layers, max_kept_fraction=1.0)  # layer 1 keeps 30 and 31 of 32: gathered too
        kept.use_kept(kept_only)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=probe).logits.sum().backward()
        kept.clear()
        return counter.get_total_flops()

    tokens, hidden = probe.numel(), 32
    # A masked q/k channel leaves out a row of query and of key, a v/o channel a row of value and a column of
    # output.dense: per layer, 3 matmuls (forward, input gradient, weight gradient) of 2 x tokens x hidden flops each.
    masked = (32 - 15) + (32 - 30) + (32 - 15) + (32 - 31)
    saved = masked * 2 * 3 * 2 * tokens * hidden
    assert flops(True) == flops(False) - saved


def test_trainer_runs_the_attention_kept_path_and_the_result_exports_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = prepare_model(tiny_bert(), RankDynaConfig(target_budget=0.4, reallocation_interval=3, warmup_fraction=0.1,
                                                      final_fraction=0.3, **CHANNELS))
    kept_attention = []

    class Probe(RankDynaCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            attention = model.bert.encoder.layer[0].attention
            indices = [attention.self.query.kept_index, attention.output.dense.kept_index]
            if any(i is not None for i in indices):
                assert attention.self.key.kept_index is indices[0] and attention.self.value.kept_index is indices[1]
                kept_attention.append(state.global_step)
            super().on_pre_optimizer_step(args, state, control, **kwargs)

    args = TrainingArguments(str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True)
    loss = Trainer(model=model, args=args, train_dataset=random_classification_dataset(),
                   callbacks=[Probe(model.rankdyna_config)]).train().training_loss
    assert torch.isfinite(torch.tensor(loss))
    assert kept_attention, "the attention never ran its kept-groups path"
    assert all(l.kept_index is None for l in gated_layers(model).values())  # plain path after training
    assert any(not l.gate.all() for n, l in gated_layers(model).items() if ".attention." in n)

    probe = _probe()
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits
    export_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, trained, atol=1e-5, rtol=0)
    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, trained, atol=1e-5, rtol=0)


def test_distillation_teacher_is_the_gated_model():
    model = prepare_model(tiny_bert(), RankDynaConfig(**CHANNELS))
    _mask_heads(model)
    probe = _probe()
    teacher = dense_teacher(model)
    assert not gated_layers(teacher)
    assert not any(isinstance(m, ScatteringProducerLinear) for m in teacher.modules())  # plain key and value
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=probe).logits, model(input_ids=probe).logits)


@pytest.mark.parametrize("arch, words", [
    ("llama", ["model_type='llama'", "RoPE", "attention_groups='singular'"]),
    ("gpt2", ["model_type='gpt2'", "fused c_attn", "attention_groups='singular'"]),
])
def test_other_attentions_are_refused_by_name(arch, words):
    model = tiny_llama() if arch == "llama" else ARCHITECTURES[arch].build()
    with pytest.raises(ValueError, match="supports BERT/RoBERTa-style self-attention only") as error:
        prepare_model(model, RankDynaConfig(**CHANNELS))
    for word in words:
        assert word in str(error.value)
    assert not gated_layers(model)  # refused before anything was replaced


@pytest.mark.parametrize("kwargs, message", [
    ({"attention_groups": "heads"}, "attention_groups must be one of"),
    ({"attention_groups": "channels", "importance": "sensitivity"}, "attention_groups='channels' needs importance"),
])
def test_bad_attention_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankDynaConfig(**kwargs)


def test_partly_targeted_attention_is_refused():
    with pytest.raises(ValueError, match="target all four or none"):
        prepare_model(tiny_bert(), RankDynaConfig(target_modules=["query", "key", "intermediate.dense",
                                                                  "output.dense"], **CHANNELS))
    with pytest.raises(ValueError, match="found no self-attention"):
        prepare_model(tiny_bert(), RankDynaConfig(target_modules=["intermediate.dense"], **CHANNELS))


def test_auto_takes_channels_where_they_apply_and_the_config_round_trips(tmp_path):
    assert RankDynaConfig().attention_groups == "auto"
    model = prepare_model(tiny_bert(), RankDynaConfig())
    assert isinstance(gated_layers(model)[f"{LAYER0}.self.query"], OutputGatedLinear)
    assert model.rankdyna_config.attention_groups == "channels"  # recorded as what ran
    RankDynaConfig(**CHANNELS).save_pretrained(str(tmp_path))
    assert RankDynaConfig.from_pretrained(str(tmp_path)).attention_groups == "channels"


@pytest.mark.parametrize("model,config,reason", [
    ("bert", {"importance": "sensitivity", "ffn_groups": "singular"}, "channels need importance='fisher'"),
    ("bert", {"target_modules": ["query", "key", "intermediate.dense"]}, "target all four or none of them"),
    ("llama", {}, "channels need BERT/RoBERTa attention, not LlamaForCausalLM"),  # RoPE
])
def test_auto_falls_back_to_singular_groups_where_channels_do_not_apply(model, config, reason, caplog):
    built = tiny_bert() if model == "bert" else ARCHITECTURES["llama"].build()
    with caplog.at_level(logging.INFO, logger="rankdyna_trainer.methods.rankdyna"):
        prepared = prepare_model(built, RankDynaConfig(**config))
    assert prepared.rankdyna_config.attention_groups == "singular"
    assert not any(isinstance(layer, (OutputGatedLinear, HeadChannelGatedLinear))
                   for layer in gated_layers(prepared).values())
    logged = [r.getMessage() for r in caplog.records if "attention_groups=" in r.getMessage()]
    assert len(logged) == 1
    attention_note = logged[0].split("attention_groups=singular (singular groups: ")[1]
    assert reason in attention_note


@pytest.mark.parametrize("index", [[3, 1], [0, 40], "0,1", [True]])
def test_a_corrupt_layout_index_is_named(index):
    entry = {"type": "scattered_linear", "in_features": 32, "out_features": 32, "index": index, "bias": True}
    with pytest.raises(ValueError, match="index must be increasing integers"):
        build_module("q", entry)
