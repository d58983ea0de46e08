"""Real packaged MiniLM, real tokenizer, real Trainer, a slice of real SST-2: fine-tune, compress, save, reload."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments

from rankdyna_trainer import (
    RankDynaCallback,
    RankDynaConfig,
    export_model,
    load_compressed_model,
    prepare_model,
    save_compressed_model,
)
from rankdyna_trainer.experiment.glue_data import load_glue

pytestmark = pytest.mark.slow


def test_minilm_sst2_slice_reaches_budget_and_reloads_identically(tmp_path, minilm_dir, glue_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    data = load_glue("sst2", glue_dir, limit=160)
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=48), batched=True)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    dense_targeted = sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and ".layer." in n)

    config = RankDynaConfig(target_budget=0.5, reallocation_interval=4)
    prepare_model(model, config)
    args = TrainingArguments(str(tmp_path / "run"), num_train_epochs=2, per_device_train_batch_size=16,
                             learning_rate=1e-4, logging_steps=8, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer,
                      callbacks=[RankDynaCallback(config)])
    trainer.train()

    modules = export_model(model)
    # A low-rank pair holds two factors; a (sliced, scattered or gathered) dense layer one weight of its kept params.
    compressed = sum(model.get_submodule(n).weight.numel() + (model.get_submodule(n).down.weight.numel()
                                                              if hasattr(model.get_submodule(n), "down") else 0)
                     for n in modules)
    target = 0.5 * dense_targeted
    assert len(modules) == 36
    assert 0.99 * target <= compressed <= target

    save_compressed_model(model, str(tmp_path / "compressed"), modules, "rankdyna", config.to_dict())
    tokenizer.save_pretrained(str(tmp_path / "compressed"))
    reloaded = load_compressed_model(str(tmp_path / "compressed"))
    batch = tokenizer(data["validation"]["sentence"][:32], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected, got = model(**batch).logits, reloaded(**batch).logits
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pattern = json.loads((tmp_path / "run" / "rank_pattern.json").read_text())
    assert pattern["params"] == compressed
