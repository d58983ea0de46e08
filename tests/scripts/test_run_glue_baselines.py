"""run_glue.py --compression_method for the baselines: the second-round fine-tuning and AdaLoRA, on MiniLM."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rankdyna_trainer import read_compression_config

from .test_run_glue import MINILM_TARGET_PARAMS, TINY, run_glue

SHORT = TINY + ["--max_train_samples", "16", "--report_to", "none"]  # later flags win: 2 optimizer steps


@pytest.mark.parametrize("method", ["svd", "fwsvd", "lorap", "mpo", "svdllm"])
def test_compressing_method_trains_and_saves_a_model_that_reloads(method, glue_dir, minilm_dir, tmp_path):
    out = tmp_path / method
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *SHORT, "--compression_method", method,
                             "--compression_budget", "0.33", "--compression_fisher_batches", "1", "--do_train",
                             "--do_eval", "--output_dir", str(out)])
    layout = read_compression_config(str(out))
    assert layout["method"] == method
    # MPO's bond dimensions fill the budget more coarsely than ranks; svdllm keeps 0.33 of every matrix (rounded
    # down per matrix); the others fill the global budget.
    used = {"mpo": 0.9, "svdllm": 0.95}.get(method, 0.99)
    assert used * 0.33 <= layout["compressed_params"] / MINILM_TARGET_PARAMS <= 0.33
    fraction = layout["compressed_params"] / MINILM_TARGET_PARAMS
    assert results["compression"]["params_fraction"] == pytest.approx(fraction)
    assert 0.0 <= results["eval"]["eval_accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.hf_quantizer.quantization_config.method == method
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 2)


def test_adalora_trains_from_the_trainer_and_exports_merged(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "adalora"
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *SHORT, "--compression_method",
                             "adalora", "--do_train", "--do_eval", "--output_dir", str(out)])
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # a plain dense model
    assert results["compression"]["params_fraction"] == 1.0
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_two_methods_at_once_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="two methods"):
        run_glue.main(["--model_name_or_path", "minilm", "--task_name", "rte", "--rankdyna", "--compression_method",
                       "fwsvd", "--do_train", "--output_dir", str(tmp_path)])


def test_unknown_method_is_rejected(tmp_path):
    with pytest.raises(run_glue.UsageError, match="invalid choice: 'fw-svd'.*'fwsvd'"):
        run_glue.main(["--model_name_or_path", "minilm", "--task_name", "rte", "--compression_method", "fw-svd",
                       "--do_train", "--output_dir", str(tmp_path)])


def test_bad_calibration_batch_count_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--compression_calibration_batches must be >= 1, got 0"):
        run_glue.main(["--model_name_or_path", "minilm", "--task_name", "rte", "--compression_method", "svdllm",
                       "--compression_calibration_batches", "0", "--do_train", "--output_dir", str(tmp_path)])


def test_rankdyna_whitened_start_calibrates_on_training_batches(glue_dir, minilm_dir, tmp_path):
    out = tmp_path / "whitened"
    results = run_glue.main(["--task_name", "rte", "--glue_dir", glue_dir, *TINY, "--report_to", "none",
                             "--rankdyna", "--rankdyna_budget", "0.5", "--rankdyna_init", "whitened",
                             "--compression_calibration_batches", "1", "--do_train", "--output_dir", str(out)])
    layout = read_compression_config(str(out))
    assert layout["method_config"]["init"] == "whitened"
    assert 0.49 <= results["compression"]["params_fraction"] <= 0.5
