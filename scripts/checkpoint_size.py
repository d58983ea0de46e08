#!/usr/bin/env python
"""How large Trainer checkpoints of a RankDyna run are, and why: the packaged MiniLM, measured on disk.

    python scripts/checkpoint_size.py [--model minilm] [--budget 0.5]

Writes one real Trainer checkpoint of the factorized training form (one optimizer step on a few random examples),
one with ``save_only_model=True``, and the exported compressed model, and prints their sizes next to the dense
model's, with the parameter counts that explain them. Prints a Markdown table (docs/README use it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, however it is installed

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model  # noqa: E402
from rankdyna_trainer.methods.rankdyna import svd_layers  # noqa: E402
from rankdyna_trainer.packaged_models import minilm_path  # noqa: E402


def folder_mb(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def count(tensors) -> int:
    return sum(t.numel() for t in tensors)


def one_step_checkpoint(model, config, output_dir: str, save_only_model: bool) -> str:
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": [0, 1, 0, 1]})
    args = TrainingArguments(output_dir, max_steps=1, per_device_train_batch_size=4, save_strategy="steps",
                             save_steps=1, save_only_model=save_only_model, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[RankDynaCallback(config)]).train()
    return os.path.join(output_dir, "checkpoint-1")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="model folder or hub id ('minilm': the packaged one)")
    parser.add_argument("--budget", type=float, default=0.5, help="RankDyna target budget of the exported model")
    args = parser.parse_args(argv)
    path = minilm_path() if args.model == "minilm" else args.model

    def load():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    rows = []
    with tempfile.TemporaryDirectory() as work:
        dense = load()
        dense.save_pretrained(os.path.join(work, "dense"))
        dense_params = count(dense.parameters())
        rows.append(("dense model (`save_pretrained`)", folder_mb(os.path.join(work, "dense")),
                     f"{dense_params:,} parameters"))

        config = RankDynaConfig(target_budget=args.budget)
        model = prepare_model(load(), config)
        layers = list(svd_layers(model).values())
        targeted = sum(l.out_features * l.in_features for l in layers)
        factors = count(p for l in layers for p in (l.U, l.s, l.V))
        statistics = count(b for l in layers for n, b in l.named_buffers()
                           if n.startswith(("sensitivity", "uncertainty")))
        trainable = count(p for p in model.parameters() if p.requires_grad)
        training_form = count(model.parameters()) + statistics + count(l.gate for l in layers)
        full = one_step_checkpoint(model, config, os.path.join(work, "full"), save_only_model=False)
        rows.append(("Trainer checkpoint, RankDyna training form (default)", folder_mb(full),
                     f"weights + importance statistics {training_form:,} values ({training_form / dense_params:.2f}x "
                     f"dense; targeted factors U, s, V {factors:,} vs {targeted:,} dense targeted weights, statistics "
                     f"{statistics:,}), plus AdamW's two moments of {trainable:,} trainable parameters"))
        only_model = one_step_checkpoint(prepare_model(load(), config), config, os.path.join(work, "only"),
                                         save_only_model=True)
        rows.append(("Trainer checkpoint with `save_only_model=True`", folder_mb(only_model),
                     "weights and importance statistics, no optimizer state (cannot resume the optimizer)"))

        for layer in layers:  # a stand-in for the end of training: the budget's worth of groups kept per matrix
            keep = max(int(args.budget * layer.out_features * layer.in_features
                           / (layer.out_features + layer.in_features)), 0)
            layer.gate[keep:] = 0
        export_model(model)
        model.save_pretrained(os.path.join(work, "exported"))
        exported_params = count(model.parameters())
        rows.append((f"exported model at budget {args.budget} (`export_model` + `save_pretrained`)",
                     folder_mb(os.path.join(work, "exported")),
                     f"{exported_params:,} parameters ({exported_params / dense_params:.2f}x dense)"))

    print(f"Model: {path}\n")
    print("| what | size on disk | why |\n|---|---|---|")
    for what, mb, why in rows:
        print(f"| {what} | {mb:.0f} MB | {why} |")


if __name__ == "__main__":
    main()
