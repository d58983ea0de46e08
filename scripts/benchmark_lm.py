"""Held-out perplexity of SmolLM2-135M compressed by SVD, activation-weighted SVD, LoRAP and RankDyna.

Every method keeps the same fraction (``--budgets``) of the dense weight parameters of the targeted matrices
(q/k/v/o/gate/up/down of all 30 blocks). Text is GLUE sentences (offline): training sentences feed the
calibration set and RankDyna's short causal-LM fine-tune, dev sentences are the held-out set. Every compressed
model is exported, saved, reloaded with ``load_compressed_model`` and evaluated from the reloaded copy.
Results go to a JSON file after each run and the Markdown table is regenerated from it, so a run cut short
still reports what finished.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/benchmark_lm.py --out docs/RESULTS_LM.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import rankdyna_trainer  # noqa: E402
from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model  # noqa: E402
from rankdyna_trainer.experiment.glue_data import load_glue  # noqa: E402
from rankdyna_trainer.methods.lorap import LoRAPConfig, LowRankSVDConfig, compress_lorap, compress_svd  # noqa: E402
from rankdyna_trainer.methods.mpo import MPOConfig, export_mpo, prepare_mpo  # noqa: E402
from rankdyna_trainer.packaged_models import smollm2_path  # noqa: E402
from rankdyna_trainer.quantizer import load_compressed_model, save_compressed_model  # noqa: E402
from rankdyna_trainer.targets import find_target_linears  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
# dense_ft and lorap_ft are controls: the same causal-LM fine-tune as RankDyna's on the dense model (budget 1.0)
# and on the LoRAP-compressed model, to separate in-domain adaptation from compression quality.
# mpo is the MPO decomposition alone; mpo_ft adds the same fine-tune, of the auxiliary tensors only (plus the
# untargeted embeddings and norms), as the MPO recipe prescribes.
METHODS = ["svd", "asvd", "lorap", "rankdyna", "dense_ft", "lorap_ft", "mpo", "mpo_ft"]
parser.add_argument("--methods", nargs="+", default=["svd", "asvd", "lorap", "rankdyna"], choices=METHODS)
parser.add_argument("--glue-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--calib-sequences", type=int, default=8)
parser.add_argument("--eval-sequences", type=int, default=32)
parser.add_argument("--train-steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="docs/RESULTS_LM.md")
parser.add_argument("--results-json", default="docs/results_lm.json")
parser.add_argument("--fresh", action="store_true", help="ignore results already in --results-json")
parser.add_argument("--report-only", action="store_true", help="rewrite --out from --results-json and exit")
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
COMMAND = "python " + " ".join(shlex.quote(a) for a in sys.argv)

# -- text: GLUE sentences, packed into fixed-length blocks ---------------------------------------------
model_dir = smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
TASKS = {"sst2": ["sentence"], "cola": ["sentence"], "mrpc": ["sentence1", "sentence2"],
         "rte": ["sentence1", "sentence2"]}


def sentences(split: str) -> list[str]:
    out = []
    for task, columns in TASKS.items():
        data = load_glue(task, args.glue_dir)[split]
        for column in columns:
            out.extend(data[column])
    return out


def blocks(texts: list[str], count: int, seed: int) -> torch.Tensor:
    """``count`` blocks of ``seq_len`` tokens: shuffled sentences joined by EOS and cut into equal pieces."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    ids, needed = [], count * args.seq_len
    for i in order:
        ids.extend(tokenizer(texts[i])["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= needed:
            break
    return torch.tensor(ids[:needed]).view(count, args.seq_len)


train_blocks_needed = args.calib_sequences + args.train_steps * args.batch_size
train_blocks = blocks(sentences("train"), train_blocks_needed, args.seed)
calib_ids, finetune_ids = train_blocks[: args.calib_sequences], train_blocks[args.calib_sequences :]
eval_ids = blocks(sentences("validation"), args.eval_sequences, args.seed)
calibration = [{"input_ids": calib_ids[i : i + 4]} for i in range(0, len(calib_ids), 4)]


@torch.no_grad()
def perplexity(model) -> float:
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(eval_ids), 4):
        batch = eval_ids[i : i + 4]
        loss = model(input_ids=batch, labels=batch).loss  # mean over the batch's shifted tokens
        n = batch.numel() - batch.shape[0]
        nll, tokens = nll + loss.item() * n, tokens + n
    return math.exp(nll / tokens)


def fresh_model():
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


dense = fresh_model()
TARGETS = find_target_linears(dense)
DENSE_TARGET_PARAMS = sum(l.weight.numel() for l in TARGETS.values())
DENSE_TOTAL_PARAMS = sum(p.numel() for p in dense.parameters())


# -- methods ----------------------------------------------------------------------------------------------
def finetune(model, callbacks=()) -> None:
    """The short causal-LM fine-tune shared by RankDyna and the fine-tuned controls (same data, steps, lr)."""
    train = Dataset.from_dict({"input_ids": finetune_ids.tolist(), "labels": finetune_ids.tolist()})
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.train_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
            save_strategy="no", report_to="none", use_cpu=True, seed=args.seed, disable_tqdm=False,
        )
        Trainer(model=model, args=training_args, train_dataset=train, callbacks=list(callbacks)).train()
    model.eval()


def run_rankdyna(model, budget: float):
    config = RankDynaConfig(target_budget=budget, warmup_fraction=0.1, final_fraction=0.2, reallocation_interval=2)
    prepare_model(model, config)
    finetune(model, [RankDynaCallback(config)])
    return export_model(model), config.to_dict()


def compress(method: str, model, budget: float):
    if method == "svd":
        config = LowRankSVDConfig(target_budget=budget)
        return compress_svd(model, config), vars(config)
    if method == "asvd":
        config = LowRankSVDConfig(target_budget=budget, activation_weighted=True)
        return compress_svd(model, config, calibration), vars(config)
    if method in ("lorap", "lorap_ft"):
        config = LoRAPConfig(target_budget=budget)
        modules = compress_lorap(model, config, calibration)
        if method == "lorap_ft":
            finetune(model)  # shapes do not change, so the layout stays valid
        return modules, vars(config)
    if method in ("mpo", "mpo_ft"):
        config = MPOConfig(target_budget=budget)
        prepare_mpo(model, config)
        if method == "mpo_ft":
            finetune(model)
        return export_mpo(model), vars(config)
    if method == "dense_ft":
        finetune(model)
        return {}, {}
    return run_rankdyna(model, budget)


# -- run, one (method, budget) at a time, saving after each -------------------------------------------------
results = {}
if os.path.isfile(args.results_json) and not args.fresh:
    with open(args.results_json) as f:
        results = json.load(f)


def save_results() -> None:
    with open(args.results_json, "w") as f:
        json.dump(results, f, indent=2)
    write_markdown()


LABELS = {"dense": "dense (no compression)", "dense_ft": "dense + same fine-tune (control)",
          "svd": "SVD (uniform rank)", "asvd": "activation-weighted SVD", "lorap": "LoRAP",
          "lorap_ft": "LoRAP + same fine-tune (control)", "mpo": "MPO (3 tensors, bond-truncated)",
          "mpo_ft": "MPO + same fine-tune (auxiliary tensors)", "rankdyna": "RankDyna (fine-tuned)"}


def planned_runs(methods: list[str], budgets: list[float]) -> list[tuple[str, float]]:
    """Cheap post-training methods first, fine-tuning ones last, so a run cut short still has the baselines."""
    order = sorted(methods, key=lambda m: m in ("rankdyna", "dense_ft", "lorap_ft", "mpo_ft"))
    return [(m, b) for m in order for b in ([1.0] if m == "dense_ft" else budgets)]


def write_markdown() -> None:
    meta = results.get("_meta", {})
    run = argparse.Namespace(**meta.get("args", vars(args)))  # the settings the numbers were measured with
    lines = [
        "# Decoder LM compression: SmolLM2-135M held-out perplexity",
        "",
        "Generated by `scripts/benchmark_lm.py`; do not edit by hand.",
        "",
        "- Commands (run in this order, each adding its rows to the same results file): "
        + "; ".join(f"`{c}`" for c in meta.get("commands", [COMMAND])),
        f"- Date of the last command: {meta.get('date')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, "
        f"rankdyna_trainer {rankdyna_trainer.__version__}, Python {platform.python_version()}",
        f"- Model: SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized to float32), targeted matrices: "
        f"{len(TARGETS)} (q/k/v/o/gate/up/down x 30 blocks), {DENSE_TARGET_PARAMS:,} dense weight params "
        f"of {DENSE_TOTAL_PARAMS:,} in the model.",
        f"- Text: GLUE sentences (SST-2, CoLA, MRPC, RTE) joined by EOS into blocks of {run.seq_len} tokens. "
        f"Calibration: {run.calib_sequences} training blocks. Fine-tune (RankDyna and the controls): "
        f"{run.train_steps} steps x "
        f"{run.batch_size} training blocks (disjoint from calibration), lr {run.lr}. Held-out: "
        f"{run.eval_sequences} blocks of dev sentences "
        f"({run.eval_sequences * (run.seq_len - 1):,} predicted tokens).",
        "- Times are wall-clock seconds of compression (+ calibration, + fine-tuning where there is one), measured "
        "side by side by this script on a shared 2-core CPU (other jobs were running): compare them only roughly.",
        "- Run as `OMP_NUM_THREADS=1 nice -n 10 <command>` with `--threads 1` (the default); the converted model "
        "cache came from `rankdyna_trainer.packaged_models.smollm2_path()`.",
        "- Every compressed model was exported, saved, reloaded with `load_compressed_model`, and evaluated "
        "after reload.",
        "",
        "| budget (kept) | method | held-out PPL | targeted params | total params | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in sorted(((k, v) for k, v in results.items() if not k.startswith("_")),
                         key=lambda kv: (-kv[1]["budget"], list(LABELS).index(kv[1]["method"]))):
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] < 1e4 else f"{r['perplexity']:.3g}"
        lines.append(f"| {r['budget']:.0%} | {LABELS[r['method']]} | {ppl} | "
                     f"{r['target_params']:,} ({r['target_params'] / DENSE_TARGET_PARAMS:.1%}) | "
                     f"{r['total_params']:,} | {r['seconds']:.0f} |")
    missing = [f"{m}@{b}" for m, b in planned_runs(run.methods, run.budgets) if f"{m}@{b}" not in results]
    if missing:
        lines += ["", f"Not finished in this run: {', '.join(missing)}."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if args.report_only:
    write_markdown()
    sys.exit(0)
SETTINGS = ("seq_len", "calib_sequences", "eval_sequences", "train_steps", "batch_size", "lr", "seed", "glue_dir")
meta = results.get("_meta", {})
if "args" in meta and any(meta["args"][k] != vars(args)[k] for k in SETTINGS):
    sys.exit(f"{args.results_json} holds results measured with other settings; pass --fresh or the same "
             f"{', '.join('--' + k.replace('_', '-') for k in SETTINGS)}.")
now = datetime.datetime.now(datetime.timezone.utc)
commands = meta.get("commands", [meta["command"]] if "command" in meta else [])
results["_meta"] = {"commands": [c for c in commands if c != COMMAND] + [COMMAND],
                    "date": now.strftime("%Y-%m-%d %H:%M UTC"), "args": vars(args)}
if "dense@1.0" not in results:
    t0 = time.perf_counter()
    results["dense@1.0"] = {"method": "dense", "budget": 1.0, "perplexity": perplexity(dense),
                            "target_params": DENSE_TARGET_PARAMS, "total_params": DENSE_TOTAL_PARAMS, "seconds": 0.0}
    print(f"dense: ppl {results['dense@1.0']['perplexity']:.2f} ({time.perf_counter() - t0:.0f}s to evaluate)",
          flush=True)
    save_results()
del dense

for method, budget in planned_runs(args.methods, args.budgets):
    key = f"{method}@{budget}"
    if key in results:
        print(f"{key}: already measured, skipping", flush=True)
        continue
    model = fresh_model()
    start = time.perf_counter()
    modules, method_config = compress(method, model, budget)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as saved:
        save_compressed_model(model, saved, modules, method, method_config)
        del model
        reloaded = load_compressed_model(saved)
    untouched = [n for n in TARGETS if n not in modules]  # dense_ft keeps every targeted matrix dense
    target_params = sum(rankdyna_trainer.export.exported_params(e) for e in modules.values())
    target_params += sum(TARGETS[n].weight.numel() for n in untouched)
    results[key] = {"method": method, "budget": budget, "perplexity": perplexity(reloaded),
                    "target_params": target_params, "total_params": sum(p.numel() for p in reloaded.parameters()),
                    "seconds": seconds}
    print(f"{key}: ppl {results[key]['perplexity']:.2f}, params {target_params:,}, {seconds:.0f}s", flush=True)
    save_results()
    del reloaded
print("done", flush=True)
