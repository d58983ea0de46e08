"""scripts/bench_deploy.py on real GLUE dev rows, the packaged tokenizer and small BERTs of its vocabulary."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from rankdyna_trainer import RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.experiment.glue_data import load_glue
from rankdyna_trainer.methods.rankdyna import gated_layers
from tests.round_trip import single_thread

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench_deploy = _load_script("bench_deploy")


def _small_bert(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160, num_labels=2)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def two_models(minilm_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    dense, compressed = tmp_path / "dense", tmp_path / "compressed"
    _small_bert(tokenizer).save_pretrained(str(dense))
    model = prepare_model(_small_bert(tokenizer), RankDynaConfig(target_budget=0.5))
    for layer in gated_layers(model).values():
        layer.gate[6:] = 0
    export_model(model)
    model.save_pretrained(str(compressed))
    (compressed / "README.md").write_text("---\ntags:\n- rankdyna\n---\n\n# from the Trainer\n\n## Compression\n")
    for folder in (dense, compressed):
        tokenizer.save_pretrained(str(folder))
    return str(dense), str(compressed)


@pytest.mark.slow  # two ONNX exports
def test_table_has_every_model_in_every_runtime(two_models, glue_dir, tmp_path):
    dense, compressed = two_models
    out = tmp_path / "deploy.json"
    with single_thread():
        result = bench_deploy.main(["--model", f"dense={dense}", "--model", f"rankdyna 0.5={compressed}",
                                    "--glue_dir", glue_dir, "--dev_limit", "40", "--rounds", "2", "--threads", "1",
                                    "--timing_batch", "4", "--timing_length", "24", "--output_json", str(out),
                                    "--update_cards"])
    rows = {(r["model"], r["runtime"]): r for r in result["rows"]}
    runtimes = ("torch", "torch-int8", "onnx", "onnx-int8")
    assert set(rows) == {(m, r) for m in ("dense", "rankdyna 0.5") for r in runtimes}
    saved = json.loads(out.read_text())
    assert saved["dev_examples"] == 40 and saved["timing_shape"] == [4, 24]

    # The floor is the majority class of these 40 dev rows; ONNX fp32 scores what PyTorch scores.
    labels = load_glue("sst2", glue_dir)["validation"].select(range(40))["label"]
    assert saved["floor"] == pytest.approx(max(labels.count(0), labels.count(1)) / 40)
    for model in ("dense", "rankdyna 0.5"):
        assert rows[(model, "onnx")]["metric"] == rows[(model, "torch")]["metric"]
        assert rows[(model, "onnx-int8")]["bytes"] < rows[(model, "onnx")]["bytes"]
        assert all(rows[(model, r)]["ms"] > 0 for r in runtimes)
    assert rows[("rankdyna 0.5", "torch")]["bytes"] < rows[("dense", "torch")]["bytes"]

    card = (Path(compressed) / "README.md").read_text()
    assert "# from the Trainer" in card  # the Trainer's part of the card is kept
    dense_metric, metric = rows[("dense", "torch")]["metric"], rows[("rankdyna 0.5", "torch")]["metric"]
    assert f"| dev accuracy | {100 * metric:.1f} (dense model: {100 * dense_metric:.1f}; " in card


def test_model_argument_must_name_a_folder(tmp_path):
    with pytest.raises(SystemExit):
        bench_deploy.parse_args(["--model", "dense"])
    with pytest.raises(FileNotFoundError, match="Model 'dense': no saved model"):
        bench_deploy.main(["--model", f"dense={tmp_path}"])
