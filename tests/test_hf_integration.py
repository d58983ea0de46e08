"""Hugging Face conveniences on compressed models: pipeline, generate with the KV cache, TensorBoard, peft LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

import rankdyna_trainer  # noqa: F401  (registers the "rankdyna" loader)
from rankdyna_trainer import LowRankLinear, RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import ScatteredLinear
from rankdyna_trainer.methods.rankdyna import gated_layers

from .compression_checks import cut_and_export
from .conftest import random_classification_dataset, tiny_bert
from .round_trip import single_thread
from .tiny_models import ARCHITECTURES


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.mark.slow
def test_text_classification_pipeline_loads_an_exported_folder(minilm_dir, tmp_path):
    from transformers import AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = cut_and_export(AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2), rank=64)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))

    classify = pipeline("text-classification", model=str(tmp_path), device="cpu")
    assert isinstance(classify.model.bert.encoder.layer[0].attention.self.query, LowRankLinear)
    sentences = ["a gripping, beautifully acted film", "dull and far too long"]
    results = classify(sentences)
    with torch.no_grad():
        probabilities = model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits.softmax(-1)
    for result, row in zip(results, probabilities):
        assert result["label"] == model.config.id2label[int(row.argmax())]
        assert result["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_compressed_llama_generates_with_its_kv_cache_after_reloading(tmp_path):
    model = cut_and_export(ARCHITECTURES["llama"].build())
    prompt = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    in_memory = model.generate(prompt, use_cache=True, **greedy)
    without_cache = model.generate(prompt, use_cache=False, **greedy)
    assert torch.equal(in_memory, without_cache)  # the cache path computes the same tokens

    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    output = reloaded.generate(prompt, use_cache=True, return_dict_in_generate=True, **greedy)
    assert torch.equal(output.sequences, in_memory)
    assert output.past_key_values is not None and output.past_key_values.get_seq_length() == prompt.shape[1] + 11


def test_tensorboard_receives_the_rankdyna_scalars(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = RankDynaConfig(target_budget=0.5, reallocation_interval=2)
    model = prepare_model(tiny_bert(), config)
    logs = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))  # transformers 5's replacement of `logging_dir`
    args = TrainingArguments(str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=8, logging_steps=2,
                             report_to=["tensorboard"], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(32),
            callbacks=[RankDynaCallback(config)]).train()

    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ("budget_params", "params", "params_fraction", "zero_rank_matrices", "zero_rank_blocks"):
        assert f"train/rankdyna/{name}" in scalars, scalars
    fractions = [e.value for e in events.Scalars("train/rankdyna/params_fraction")]
    assert len(fractions) >= 5 and fractions[0] == 1.0 and fractions[-1] <= 0.5


@pytest.mark.parametrize("attention_groups,attention_layer", [("singular", LowRankLinear), ("auto", ScatteredLinear)])
def test_lora_on_an_exported_model_trains_saves_and_reloads(tmp_path, attention_groups, attention_layer):
    from peft import LoraConfig, get_peft_model

    from rankdyna_trainer.adapters import load_lora_adapter, with_low_rank_support

    compressed = tmp_path / "compressed"
    cut_and_export(tiny_bert(), attention_groups=attention_groups).save_pretrained(str(compressed))

    config = with_low_rank_support(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                              task_type="SEQ_CLS"))
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(compressed)), config)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer, attention_layer)
    lora_b = query.lora_B["default"].weight
    assert not lora_b.any()  # LoRA starts as a no-op
    args = TrainingArguments(str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(32)).train()
    assert lora_b.any()  # the adapter trained
    base_weight = query.base_layer.weight.detach().clone()

    model.eval()
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))

    reloaded = load_lora_adapter(AutoModelForSequenceClassification.from_pretrained(str(compressed)),
                                 str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    torch.testing.assert_close(reloaded.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                               base_weight)  # the compressed base stayed frozen
    with pytest.raises(ValueError, match="cannot be merged into a compressed low-rank layer"):
        reloaded.merge_and_unload()


@pytest.mark.slow  # SVD of SmolLM2-135M's 120 matrices: about 10 s
def test_compressed_smollm2_generates_the_same_greedy_tokens_after_reloading(tmp_path):
    from transformers import AutoTokenizer

    from .test_packaged_models import _require_smollm2

    _require_smollm2()
    from rankdyna_trainer.packaged_models import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prepare_model(model, RankDynaConfig())
    for layer in gated_layers(model).values():  # the leading 40 % of groups (below break-even) and FFN channels
        layer.gate[int(0.4 * layer.gate.numel()):] = 0
    export_model(model)
    model.eval()
    prompt = tokenizer(["The capital of France is"], return_tensors="pt")
    greedy = dict(max_new_tokens=8, do_sample=False)
    in_memory = model.generate(**prompt, use_cache=True, **greedy)
    assert torch.equal(in_memory, model.generate(**prompt, use_cache=False, **greedy))

    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert torch.equal(reloaded.generate(**prompt, use_cache=True, **greedy), in_memory)
