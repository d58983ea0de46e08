"""Saving compressed models for a reload in a fresh interpreter (``tests/reload_worker.py``), and running it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from rankdyna_trainer.export import exported_params

from .tiny_models import example_inputs, training_dataset

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second thread waiting for a
    busy core makes each small kernel many times slower (measured: 4 Trainer steps of a tiny T5 took 18 s with 2
    threads beside another job, 0.4 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_steps(model, task: str, output_dir, callbacks=(), steps: int = 4) -> None:
    """``steps`` optimizer steps of the real Trainer on random examples of ``task``."""
    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             logging_steps=2, seed=0)
    model.train()
    Trainer(model=model, args=args, train_dataset=training_dataset(task), callbacks=list(callbacks)).train()
    model.eval()


def save_for_reload(model, folder, task: str, auto_class: str, modules: dict) -> dict:
    """``model.save_pretrained(folder)`` plus the inputs and outputs the reloaded model must reproduce."""
    folder = Path(folder)
    model.eval()
    inputs = example_inputs(task)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(str(folder))
    torch.save((inputs, logits), folder / "expected_io.pt")
    return {"folder": str(folder), "auto_class": auto_class, "io": str(folder / "expected_io.pt"),
            "modules": sorted(modules)}


def reload_in_fresh_process(manifest: dict, workdir, without_package: bool = False) -> dict:
    """Run ``tests/reload_worker.py`` once over every saved folder; returns its JSON output."""
    workdir = Path(workdir)
    manifest_path, results_path = workdir / "manifest.json", workdir / "results.json"
    manifest_path.write_text(json.dumps(manifest))
    # This checkout's package, however it is installed; one thread, as for the tiny models in this process.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(REPO / "tests" / "reload_worker.py"), str(manifest_path), str(results_path)]
    result = subprocess.run(args + (["--without-package"] if without_package else []), cwd=str(workdir), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(results_path.read_text())


def exported_total(modules: dict) -> int:
    return sum(exported_params(e) for e in modules.values())
