"""The exported model outside PyTorch training: ONNX Runtime, dynamic int8, the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from rankdyna_trainer import LowRankLinear, RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.deploy import (
    export_onnx,
    onnx_session,
    quantize_onnx_int8,
    quantize_torch_int8,
    run_onnx,
    write_model_card,
)
from rankdyna_trainer.export import ScatteredLinear
from rankdyna_trainer.methods.rankdyna import gated_layers

from .conftest import random_classification_dataset, tiny_bert, tiny_llama
from .round_trip import single_thread

pytest.importorskip("onnxruntime")


def _compressed(model, rank: int = 4, attention_groups: str = "singular"):
    """Every attention matrix cut to ``rank`` groups (singular groups: low-rank pairs; ``'auto'``: BERT's per-head
    channels) and every FFN to ``rank`` channels, exported."""
    prepare_model(model, RankDynaConfig(attention_groups=attention_groups))
    for layer in gated_layers(model).values():
        layer.gate[rank:] = 0
    export_model(model)
    return model.eval()


def _ids(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_onnx")
    model = _compressed(tiny_bert())
    return model, export_onnx(model, folder / "model.onnx", _ids(2, 8))


@pytest.mark.slow  # the dynamo exporter: about 10 s per model
def test_compressed_encoder_runs_in_onnx_runtime_like_pytorch(bert_onnx):
    model, path = bert_onnx
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    session = onnx_session(path, threads=1)
    for batch, length in ((2, 8), (5, 13)):  # the export's shapes and others: batch and length are dynamic
        inputs = _ids(batch, length, seed=batch)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        np.testing.assert_allclose(run_onnx(session, inputs), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_attention_channels_run_in_onnx_runtime_like_pytorch(tmp_path):
    model = _compressed(tiny_bert(), rank=3, attention_groups="auto")  # the default layout on BERT
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, ScatteredLinear)
    path = export_onnx(model, tmp_path / "model.onnx", _ids(2, 8))
    inputs = _ids(4, 11, seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    np.testing.assert_allclose(run_onnx(onnx_session(path, threads=1), inputs), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compressed_decoder_runs_in_onnx_runtime_like_pytorch(tmp_path):
    model = _compressed(tiny_llama())
    path = export_onnx(model, tmp_path / "llama.onnx", _ids(2, 6))
    inputs = _ids(3, 11, seed=4)
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits.numpy()
    np.testing.assert_allclose(run_onnx(onnx_session(path, threads=1), inputs), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_onnx_int8_is_smaller_and_close_to_fp32(bert_onnx, tmp_path):
    model, path = bert_onnx
    quantized = quantize_onnx_int8(path, tmp_path / "model.int8.onnx")
    assert quantized.stat().st_size < path.stat().st_size
    inputs = _ids(4, 10, seed=7)
    fp32 = run_onnx(onnx_session(path, threads=1), inputs)
    int8 = run_onnx(onnx_session(quantized, threads=1), inputs)
    assert np.abs(int8 - fp32).max() < 0.05 * np.abs(fp32).max() + 0.02


def test_torch_int8_quantizes_both_factors_and_stays_close():
    model = _compressed(tiny_bert())
    quantized = quantize_torch_int8(model)
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and not any(isinstance(m, LowRankLinear) for m in quantized.modules())
    int8_linears = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(int8_linears) >= 2 * len(low_rank)
    inputs = _ids(3, 9, seed=2)
    with torch.no_grad():
        fp32, int8 = model(**inputs).logits, quantized(**inputs).logits
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max() + 0.02
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LowRankLinear)  # the original is untouched


def test_torch_int8_quantizes_the_kept_dims_of_attention_channels():
    model = _compressed(tiny_bert(), rank=3, attention_groups="auto")  # the default layout on BERT
    quantized = quantize_torch_int8(model)
    attention = quantized.bert.encoder.layer[0].attention
    for layer in (attention.self.query, attention.self.key, attention.self.value, attention.output.dense):
        assert isinstance(layer.linear, torch.ao.nn.quantized.dynamic.Linear)
    inputs = _ids(3, 9, seed=2)
    with torch.no_grad():
        fp32, int8 = model(**inputs).logits, quantized(**inputs).logits
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max() + 0.02


def test_onnx_export_rejects_inputs_it_cannot_keep_dynamic(tmp_path):
    with pytest.raises(ValueError, match="both sizes >= 2"):
        export_onnx(tiny_bert(), tmp_path / "m.onnx", {"input_ids": torch.ones(1, 8, dtype=torch.long)})


def test_model_card_states_the_compression_from_the_trainer(tmp_path):
    from huggingface_hub import ModelCard

    config = RankDynaConfig(target_budget=0.5, reallocation_interval=2)
    model = prepare_model(tiny_bert(), config)
    out = tmp_path / "run"
    args = TrainingArguments(str(out), max_steps=10, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=random_classification_dataset(32),
                      callbacks=[RankDynaCallback(config)])
    trainer.train()
    export_model(model)
    model.save_pretrained(str(out))
    (out / "rank_heatmap.png").write_bytes(b"\x89PNG")  # what run_glue.py draws beside the model

    path = write_model_card(out, trainer, metric_name="accuracy", metric=0.857, dense_metric=0.869, floor=0.509,
                            dataset="glue/sst2")
    card = ModelCard.load(str(path))  # valid metadata for push_to_hub
    assert "rankdyna" in card.data.tags
    text = path.read_text()
    pattern = json.loads((out / "rank_pattern.json").read_text())
    assert "RankDyna" in text and "| target budget | 0.5 of the targeted weights |" in text
    assert f"{pattern['params']:,} of {pattern['dense_params']:,}" in text
    assert "| accuracy | 85.7 (dense model: 86.9; constant-prediction floor: 50.9) |" in text
    assert "![kept rank per matrix](rank_heatmap.png)" in text
    assert "import rankdyna_trainer" in text
    assert "learning_rate" in text  # the Trainer's hyperparameters section
    assert AutoModelForSequenceClassification.from_pretrained(str(out)) is not None  # the card leaves loading alone

    write_model_card(out, metric_name="accuracy", metric=0.857, dense_metric=0.87, floor=0.509)  # update, no trainer
    updated = path.read_text()
    assert "| accuracy | 85.7 (dense model: 87.0; constant-prediction floor: 50.9) |" in updated
    assert "learning_rate" in updated and updated.count("## Compression") == 1


def test_model_card_rejects_a_percentage_given_as_metric(tmp_path):
    model = _compressed(tiny_bert())
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="fraction in \\[-1, 1\\].*got 85.7"):
        write_model_card(tmp_path, metric=85.7)
