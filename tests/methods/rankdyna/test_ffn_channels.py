"""RankDyna with FFN intermediate channels as groups (ffn_groups='channels'), next to the attention's singular
groups under one budget: layer maths, accounting, export and reload, on LLaMA and BERT."""

import json

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.budget import allocate_by_cost
from rankdyna_trainer.export import exported_params
from rankdyna_trainer.methods.rankdyna import ChannelGatedLinear, SVDLinear, gated_layers
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_bert, tiny_llama


def test_channel_gate_gradient_is_the_loss_change_of_each_channel():
    torch.manual_seed(0)
    up, down = nn.Linear(6, 10), nn.Linear(10, 4)
    layer = ChannelGatedLinear.from_linear(down, {"up": up}).train()
    h = torch.relu(up(torch.randn(3, 5, 6))).detach()
    layer(h).square().sum().backward()
    # dL/dgate_j = sum over tokens of h_j * dL/dh_j, with dL/dy = 2y for this loss.
    expected = (h * ((2 * down(h)) @ down.weight)).sum(dim=(0, 1))
    torch.testing.assert_close(layer.gate_grad, expected)
    assert layer.group_cost == 4 + 6 and layer.full_cost == 10 * 10


def test_masked_channel_is_removed_from_the_output():
    torch.manual_seed(0)
    down = nn.Linear(10, 4)
    layer = ChannelGatedLinear.from_linear(down, {"up": nn.Linear(6, 10)}).eval()
    layer.gate[3] = 0
    h = torch.randn(2, 10)
    without = h.clone()
    without[:, 3] = 0
    torch.testing.assert_close(layer(h), down(without))


def test_channels_compete_with_singular_groups_by_score_and_cost():
    # One 8x8 matrix (group cost 16, dense 64) and an FFN of 5 channels of cost 10 (no break-even before all 5).
    scores = [torch.tensor([9.0, 1.0, 0.5]), torch.tensor([8.0, 7.0, 0.1, 6.0, 0.2])]
    keep = allocate_by_cost(scores, [(16, 64), (10, 50)], budget_params=16 + 3 * 10)
    assert keep[0].tolist() == [True, False, False]
    assert keep[1].tolist() == [True, True, False, True, False]


def _train(model, config, train, tmp_path, calibration=None, steps=10):
    prepare_model(model, config, calibration)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[RankDynaCallback(config)])
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    with open(tmp_path / "run" / "rank_pattern.json") as f:
        return json.load(f)


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_llama_channels_meet_budget_export_and_reload(init, tmp_path):
    model = tiny_llama()
    dense = sum(l.weight.numel() for l in find_target_linears(model).values())
    ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    config = RankDynaConfig(target_budget=0.4, reallocation_interval=1, init=init, ffn_groups="channels")
    calibration = [{"input_ids": ids[:8]}] if init == "whitened" else None
    probe_model = tiny_llama()
    prepare_model(probe_model, config, calibration)
    layers = gated_layers(probe_model)
    channel = {n: l for n, l in layers.items() if isinstance(l, ChannelGatedLinear)}
    assert sorted(channel) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert channel["model.layers.0.mlp.down_proj"].producers == ["model.layers.0.mlp.gate_proj",
                                                                 "model.layers.0.mlp.up_proj"]
    assert {n.rsplit(".", 1)[1] for n, l in layers.items() if isinstance(l, SVDLinear)} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    assert sum(l.full_cost for l in layers.values()) == dense

    pattern = _train(model, config, train, tmp_path, calibration)
    assert pattern["params"] <= 0.4 * dense and pattern["dense_params"] == dense
    kept_channels = {n: r for n, r in pattern["ranks"].items() if n.endswith("down_proj")}
    assert all(0 < r < 64 for r in kept_channels.values()), kept_channels  # pruned, not wiped out

    probe = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model.eval()(input_ids=probe).logits
    modules = export_model(model)
    assert not gated_layers(model)
    assert sum(exported_params(e) for e in modules.values()) == pattern["params"]
    mlp = model.model.layers[0].mlp
    width = kept_channels["model.layers.0.mlp.down_proj"]
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == width
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, before)

    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, before)


def test_bert_channels_leave_the_attention_output_factorized(tmp_path):
    model = tiny_bert()
    dense = sum(l.weight.numel() for l in find_target_linears(model).values())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (32, 12), generator=g)
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": torch.randint(0, 2, (32,), generator=g).tolist()})
    # Singular attention groups: the attention output shares the FFN output's suffix, and must stay factorized.
    config = RankDynaConfig(target_budget=0.5, reallocation_interval=1, ffn_groups="channels",
                            attention_groups="singular")
    pattern = _train(model, config, train, tmp_path)
    assert pattern["params"] <= 0.5 * dense and pattern["dense_params"] == dense
    layers = gated_layers(model)
    assert isinstance(layers["bert.encoder.layer.0.output.dense"], ChannelGatedLinear)
    assert isinstance(layers["bert.encoder.layer.0.attention.output.dense"], SVDLinear)
    assert "bert.encoder.layer.0.intermediate.dense" not in layers

    probe = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model.eval()(input_ids=probe).logits
    modules = export_model(model)
    assert sum(exported_params(e) for e in modules.values()) == pattern["params"]
    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, before)


@pytest.mark.parametrize("kwargs, message", [
    ({"ffn_groups": "rows"}, "ffn_groups must be one of"),
    ({"ffn_groups": "channels", "importance": "sensitivity"}, "needs importance='fisher'"),
    ({"ffn_groups": "channels", "ffn_in_modules": ["up_proj"]}, "Pass both ffn_in_modules and ffn_out_modules"),
    ({"ffn_groups": "channels", "ffn_in_modules": "up_proj", "ffn_out_modules": ["down_proj"]},
     "non-empty list of module-name suffixes"),
])
def test_bad_ffn_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankDynaConfig(**kwargs)


def test_unknown_architecture_asks_for_the_ffn_roles():
    model = tiny_llama()
    model.config.model_type = "my_llama"
    with pytest.raises(ValueError, match="no module roles for model_type='my_llama'; pass ffn_in_modules"):
        prepare_model(model, RankDynaConfig(ffn_groups="channels"))
    given = RankDynaConfig(ffn_groups="channels", ffn_in_modules=["gate_proj", "up_proj"],
                           ffn_out_modules=["down_proj"])
    prepare_model(model, given)
    assert sum(isinstance(l, ChannelGatedLinear) for l in gated_layers(model).values()) == 2


def _kinds(model) -> dict[str, int]:
    layers = gated_layers(model).values()
    return {"channels": sum(isinstance(l, ChannelGatedLinear) for l in layers),
            "singular": sum(isinstance(l, SVDLinear) for l in layers)}


def test_auto_prunes_ffn_channels_where_the_roles_are_known(caplog):
    assert RankDynaConfig().ffn_groups == "auto"
    with caplog.at_level("INFO", logger="rankdyna_trainer.methods.rankdyna.model"):
        bert = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular"))
    assert _kinds(bert) == {"channels": 2, "singular": 2 * 4}  # per layer: q, k, v, attention output; FFN whole
    assert "2 FFNs pruned by intermediate channels" in caplog.text
    assert _kinds(prepare_model(tiny_llama(), RankDynaConfig())) == {"channels": 2, "singular": 2 * 4}


@pytest.mark.parametrize("case", ["unknown architecture", "sensitivity importance", "no FFN targeted"])
def test_auto_falls_back_to_singular_groups(case):
    model, config = tiny_llama(), RankDynaConfig()
    if case == "unknown architecture":
        model.config.model_type = "my_llama"
    elif case == "sensitivity importance":
        config = RankDynaConfig(importance="sensitivity")
    else:
        config = RankDynaConfig(target_modules=["q_proj", "v_proj"])
    prepare_model(model, config)
    kinds = _kinds(model)
    assert kinds["channels"] == 0 and kinds["singular"] == (2 * 2 if case == "no FFN targeted" else 2 * 7)
