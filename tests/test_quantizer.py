"""Hugging Face-native loading of compressed models: what transformers' own from_pretrained options do with them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from rankdyna_trainer import LowRankLinear, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import GatheredLinear, ScatteredLinear
from rankdyna_trainer.methods.rankdyna import gated_layers
from rankdyna_trainer.quantizer import load_compressed_model, read_compression_config, save_compressed_model

from .compression_checks import cut_and_export
from .conftest import tiny_bert, tiny_llama
from .round_trip import reload_in_fresh_process, save_for_reload, single_thread

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))



@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# Each exported attention layout: singular groups (LowRankLinear pairs) and the default per-head channels.
ATTENTION_LAYOUTS = {"singular": LowRankLinear, "auto": (ScatteredLinear, GatheredLinear)}


@pytest.fixture(params=list(ATTENTION_LAYOUTS))
def saved_bert(tmp_path, request):
    model = cut_and_export(tiny_bert(), attention_groups=request.param)
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        return tmp_path, model(input_ids=IDS).logits, ATTENTION_LAYOUTS[request.param]


def test_dtype_argument_loads_the_compressed_layers_in_that_dtype(saved_bert):
    folder, _, attention_layer = saved_bert
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.bfloat16)
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(layer, attention_layer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_checkpoint_and_device_map_load_through_transformers(saved_bert, tmp_path):
    folder, expected, _ = saved_bert
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(str(sharded), device_map="cpu",
                                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, atol=1e-6, rtol=1e-6)


def test_base_model_class_loads_a_layout_saved_with_a_task_head(saved_bert):
    folder, _, attention_layer = saved_bert
    base, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)  # names lose the "bert." prefix
    assert isinstance(base.get_submodule("encoder.layer.1.attention.output.dense"), attention_layer)
    assert base.get_submodule("encoder.layer.1.output.dense").in_features == 4  # the FFN's 4 kept channels
    assert not info["missing_keys"] and not info["mismatched_keys"]


def test_reloaded_model_saves_its_layout_again(saved_bert, tmp_path):
    folder, expected, _ = saved_bert
    again = tmp_path / "again"
    AutoModelForSequenceClassification.from_pretrained(str(folder)).save_pretrained(str(again))
    assert read_compression_config(str(again)) == read_compression_config(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed_model(str(again))(input_ids=IDS).logits, expected)


def test_reloaded_model_fine_tunes_with_the_trainer(saved_bert, tmp_path):
    from .round_trip import train_steps

    folder, _, _ = saved_bert
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    before = model.get_submodule("bert.encoder.layer.0.attention.self.query").weight.detach().clone()
    train_steps(model, "classification", tmp_path / "run", steps=2)  # Trainer refuses "quantized" models
    assert not torch.equal(model.get_submodule("bert.encoder.layer.0.attention.self.query").weight, before)


def test_torch_compiled_model_exports_plain_names_and_reloads(tmp_path):
    model = tiny_llama()
    prepare_model(model, RankDynaConfig())
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=IDS)
    for layer in gated_layers(compiled).values():
        layer.gate[3:] = 0
    modules = export_model(compiled)
    assert modules and not any(name.startswith("_orig_mod") for name in modules)
    with torch.no_grad():
        expected = compiled(input_ids=IDS).logits
    compiled.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_save_compressed_model_is_save_pretrained_with_the_layout(tmp_path):
    model = cut_and_export(tiny_bert())
    save_compressed_model(model, str(tmp_path))  # export_model recorded the layout: nothing else to pass
    layout = read_compression_config(str(tmp_path))
    assert layout["method"] == "rankdyna" and len(layout["modules"]) == 12


def test_without_the_package_loading_fails_loudly_instead_of_randomly(tmp_path):
    """In an interpreter that never imports rankdyna_trainer, transformers skips the unknown quantization method;
    the compressed layers' `weight` keys then do not fit the dense layers and loading stops."""
    manifest = {}
    for name, model, auto_class in (("bert", tiny_bert(), "AutoModelForSequenceClassification"),
                                    ("llama", tiny_llama(), "AutoModelForCausalLM")):
        cut_and_export(model)
        manifest[name] = save_for_reload(model, tmp_path / name, "classification", auto_class, {})
    results = reload_in_fresh_process(manifest, tmp_path, without_package=True)
    assert not results["package_imported"]
    for name in manifest:
        case = results["cases"][name]
        assert not case["loaded"] and "RuntimeError" in case["error"] and "ignore_mismatched_sizes" in case["error"]
