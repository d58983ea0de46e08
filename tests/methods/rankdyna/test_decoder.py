"""RankDyna end to end on a decoder-only (LLaMA) model: causal-LM training through the real Trainer."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.export import exported_params
from rankdyna_trainer.methods.rankdyna import svd_layers
from rankdyna_trainer.quantizer import read_compression_config
from rankdyna_trainer.targets import find_target_linears
from tests.conftest import tiny_llama


def test_default_llama_targets_are_all_seven_projections():
    names = find_target_linears(tiny_llama())
    suffixes = sorted({n.rsplit(".", 1)[1] for n in names})
    assert suffixes == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(names) == 14 and not any("lm_head" in n for n in names)


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_causal_lm_training_meets_budget_exports_and_reloads(init, tmp_path):
    model = tiny_llama()
    dense = sum(l.weight.numel() for l in find_target_linears(model).values())
    ids = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(0))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    config = RankDynaConfig(target_budget=0.4, warmup_fraction=0.1, final_fraction=0.2, reallocation_interval=1,
                            init=init)
    prepare_model(model, config, [{"input_ids": ids[:8]}])
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[RankDynaCallback(config)])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))

    with open(tmp_path / "run" / "rank_pattern.json") as f:
        pattern = json.load(f)
    assert pattern["params"] <= 0.4 * dense and pattern["dense_params"] == dense
    # Budget accounting is shared: the pattern's count is what the exported model stores.
    modules = export_model(model)
    assert not svd_layers(model)
    assert sum(exported_params(e) for e in modules.values()) == pattern["params"]

    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert read_compression_config(str(tmp_path / "saved"))["method_config"]["target_budget"] == 0.4
    probe = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, model.eval()(input_ids=probe).logits)
