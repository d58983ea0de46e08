"""Dense against compressed as deployed: PyTorch, ONNX Runtime and dynamic int8 of each, in one process.

Every variant of each model is scored on the task's dev set (main metric, beside the constant-prediction floor),
measured on disk, and timed round-robin against all the others on one fixed batch (the median of ``rounds``
forwards), so that a slower or busier moment of a shared machine hits every variant alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..deploy import export_onnx, onnx_session, quantize_onnx_int8, quantize_torch_int8, run_onnx, torch_module_bytes
from .glue_data import get_task, load_glue
from .glue_metrics import constant_prediction_floor, load_glue_metric, main_metric

RUNTIMES = ("torch", "torch-int8", "onnx", "onnx-int8")


@dataclass
class Variant:
    """One model in one runtime: ``predict`` maps a batch of torch tensors to logits (numpy)."""

    model: str  # e.g. "dense", "rankdyna 0.5"
    runtime: str  # one of RUNTIMES
    predict: Callable[[dict], np.ndarray]
    bytes_on_disk: int
    results: dict = field(default_factory=dict)


def model_file_bytes(folder: str) -> int:
    """Bytes of the weights files of a ``save_pretrained`` folder."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))


def encode_dev(task_name: str, glue_dir: str | None, tokenizer, max_length: int, limit: int | None = None):
    """The dev split's tokenized columns and labels (no padding yet)."""
    task = get_task(task_name)
    dev = load_glue(task, glue_dir)["validation"]
    if limit:
        dev = dev.select(range(min(limit, len(dev))))
    texts = [list(dev[c]) for c in task.text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    return encoded, np.asarray(dev["label"])


def dev_batches(tokenizer, encoded, batch_size: int) -> list[dict]:
    """Dynamically padded batches in dataset order (as the Trainer's padding collator makes them)."""
    keys = list(encoded.keys())
    n = len(encoded["input_ids"])
    return [tokenizer.pad({k: encoded[k][i:i + batch_size] for k in keys}, return_tensors="pt")
            for i in range(0, n, batch_size)]


def timing_batch(tokenizer, encoded, batch_size: int, length: int) -> dict:
    """``batch_size`` dev examples padded (or cut) to exactly ``length`` tokens: the fixed shape that is timed."""
    keys = list(encoded.keys())
    rows = {k: [encoded[k][i % len(encoded["input_ids"])][:length] for i in range(batch_size)] for k in keys}
    return tokenizer.pad(rows, padding="max_length", max_length=length, return_tensors="pt")


def torch_predictor(model) -> Callable[[dict], np.ndarray]:
    model.eval()

    def predict(batch: dict) -> np.ndarray:
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()

    return predict


def onnx_predictor(path: Path, threads: int) -> Callable[[dict], np.ndarray]:
    session = onnx_session(path, threads=threads)
    return lambda batch: run_onnx(session, batch)


def build_variants(name: str, folder: str, example: dict, workdir: Path, threads: int,
                   runtimes: tuple[str, ...] = RUNTIMES) -> list[Variant]:
    """The model saved in ``folder`` in each runtime: fp32 PyTorch, torch int8, ONNX, ONNX Runtime int8."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    variants = []
    if "torch" in runtimes:
        variants.append(Variant(name, "torch", torch_predictor(model), model_file_bytes(folder)))
    if "torch-int8" in runtimes:
        quantized = quantize_torch_int8(model)
        variants.append(Variant(name, "torch-int8", torch_predictor(quantized), torch_module_bytes(quantized)))
    if "onnx" in runtimes or "onnx-int8" in runtimes:
        slug = name.replace(" ", "_")
        fp32 = export_onnx(model, workdir / f"{slug}.onnx", example)
        if "onnx" in runtimes:
            variants.append(Variant(name, "onnx", onnx_predictor(fp32, threads), fp32.stat().st_size))
        if "onnx-int8" in runtimes:
            int8 = quantize_onnx_int8(fp32, workdir / f"{slug}.int8.onnx")
            variants.append(Variant(name, "onnx-int8", onnx_predictor(int8, threads), int8.stat().st_size))
    return variants


def score(variant: Variant, task_name: str, batches: list[dict], labels: np.ndarray) -> float:
    """The task's main dev metric of ``variant`` (a fraction)."""
    logits = np.concatenate([variant.predict(batch) for batch in batches])
    metric = load_glue_metric(task_name)
    return float(metric.compute(predictions=logits.argmax(-1), references=labels)[main_metric(task_name)])


def time_round_robin(variants: list[Variant], batch: dict, rounds: int, warmup: int = 1) -> None:
    """Median forward time (ms) of each variant on ``batch``, the variants taking turns within each round."""
    for variant in variants:
        for _ in range(warmup):
            variant.predict(batch)
    times = {id(v): [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            variant.predict(batch)
            times[id(variant)].append(1000 * (time.perf_counter() - start))
    for variant in variants:
        variant.results["ms"] = statistics.median(times[id(variant)])


def benchmark(models: dict[str, str], task_name: str = "sst2", glue_dir: str | None = None, max_length: int = 64,
              eval_batch_size: int = 64, timing_shape: tuple[int, int] = (32, 128), rounds: int = 7,
              threads: int = 2, dev_limit: int | None = None, workdir: str | None = None,
              runtimes: tuple[str, ...] = RUNTIMES) -> dict:
    """Score, size and time every model of ``models`` (name -> saved folder) in each runtime. Returns the rows and
    the settings (for the table's caption)."""
    from transformers import AutoTokenizer

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ValueError(f"Unknown runtime(s) {unknown}: choose from {list(RUNTIMES)}.")
    for name, folder in models.items():
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"Model {name!r}: no saved model (config.json) in {folder}.")
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(next(iter(models.values())))
    encoded, labels = encode_dev(task_name, glue_dir, tokenizer, max_length, dev_limit)
    batches = dev_batches(tokenizer, encoded, eval_batch_size)
    fixed = timing_batch(tokenizer, encoded, *timing_shape)
    example = {k: v[:2, :8] for k, v in fixed.items()}
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        variants = [v for name, folder in models.items()
                    for v in build_variants(name, folder, example, Path(scratch), threads, runtimes)]
        for variant in variants:
            variant.results["metric"] = score(variant, task_name, batches, labels)
        time_round_robin(variants, fixed, rounds)
    floor = constant_prediction_floor(task_name, labels)[main_metric(task_name)]
    rows = [{"model": v.model, "runtime": v.runtime, "metric": v.results["metric"], "bytes": v.bytes_on_disk,
             "ms": v.results["ms"]} for v in variants]
    return {"rows": rows, "task": task_name, "metric": main_metric(task_name), "floor": floor,
            "dev_examples": len(labels), "max_length": max_length, "timing_shape": list(timing_shape),
            "rounds": rounds, "threads": threads, "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def markdown_table(result: dict) -> str:
    """One row per model and runtime: dev metric (floor in the header), size on disk, latency and speed-up
    against the dense model in PyTorch fp32."""
    rows = result["rows"]
    reference = next((r for r in rows if r["runtime"] == "torch"), rows[0])
    header = (f"| model | runtime | dev {result['metric']} (floor {100 * result['floor']:.1f}) | size on disk (MB) | "
              f"ms per {result['timing_shape'][0]} x {result['timing_shape'][1]} batch | speed-up vs "
              f"{reference['model']} {reference['runtime']} |")
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['runtime']} | {100 * r['metric']:.1f} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['ms']:.0f} | {reference['ms'] / r['ms']:.2f} |")
    return "\n".join(lines)
