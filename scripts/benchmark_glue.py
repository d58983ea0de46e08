"""Head-to-head GLUE benchmark: dense fine-tuning, RankDyna and the baselines on one model and budget.

Every (task, method, budget, seed) run writes one JSON under --results_dir and is skipped when that file
exists, so the table can be built across sessions, split per task (run one process per task) or extended.
Post-hoc methods (svd, fwsvd, tfwsvd, ars) start from the dense fine-tuned model of the same task and seed
(kept under --models_dir) and their wall time counts that first round too. After the runs (or with
--report_only) docs/RESULTS.md and a plot are regenerated from every JSON found.

    nice -n 10 python scripts/benchmark_glue.py --tasks rte mrpc --budgets 0.5 0.33 --epochs 2
    python scripts/benchmark_glue.py --report_only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rankdyna_trainer.experiment.glue_data import get_task, load_glue  # noqa: E402
from rankdyna_trainer.methods import METHODS, get_method  # noqa: E402
from rankdyna_trainer.methods.adalora import adalora_rank_pattern  # noqa: E402
from rankdyna_trainer.methods.rankdyna import rank_pattern  # noqa: E402
from rankdyna_trainer.packaged_models import minilm_path  # noqa: E402
from rankdyna_trainer.quantizer import (  # noqa: E402
    load_compressed_model,
    read_compression_config,
    save_compressed_model,
)
from rankdyna_trainer.targets import find_target_linears  # noqa: E402

METHOD_ORDER = ["dense", "rankdyna", "fwsvd", "ars", "svd", "tfwsvd", "adalora"]
PRIMARY_METRIC = {"rte": "accuracy", "mrpc": "f1", "cola": "mcc", "sst2": "accuracy"}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc"])
parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=sorted(METHODS))
parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.33])
parser.add_argument("--seeds", nargs="+", type=int, default=[42])
parser.add_argument("--epochs", type=float, default=2.0, help="per fine-tuning round, the same for every method")
parser.add_argument("--learning_rate", type=float, default=1e-4)
parser.add_argument("--adalora_learning_rate", type=float, default=1e-3, help="adapters train at a higher rate")
parser.add_argument("--batch_size", type=int, default=32)
parser.add_argument("--max_seq_length", type=int, default=128)
parser.add_argument("--fisher_batches", type=int, default=32, help="task batches for Fisher (fwsvd/tfwsvd/ars)")
parser.add_argument("--ars_steps", type=int, default=80, help="hypernetwork steps of ARS mask learning")
parser.add_argument("--ars_learning_rate", type=float, default=1e-2, help="Adam rate of the ARS hypernetwork")
parser.add_argument("--als_iterations", type=int, default=5, help="TFWSVD alternating least-squares sweeps")
parser.add_argument("--limit", type=int, default=None, help="first N rows of each split (smoke runs only)")
parser.add_argument("--train_limit", type=int, default=None, help="first N training rows (dev sets stay full)")
parser.add_argument("--rankdyna_interval", type=int, default=10, help="RankDyna steps between reallocations")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
parser.add_argument("--glue_dir", default=os.path.join(REPO, "..", "shared", "data", "glue"))
parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "glue"))
parser.add_argument("--models_dir", default=os.path.join(REPO, "runs", "benchmark_glue"))
parser.add_argument("--report", default=os.path.join(REPO, "docs", "RESULTS.md"))
parser.add_argument("--report_only", action="store_true")
parser.add_argument("--skip_latency", action="store_true", help="no per-run latency (use --latency_rounds later)")
parser.add_argument("--latency_rounds", type=int, default=0,
                    help="after the runs: time every measured layout against dense, round-robin, this many rounds")
parser.add_argument("--no_report", action="store_true")
args = parser.parse_args()
torch.set_num_threads(args.threads)
os.environ.setdefault("WANDB_MODE", "offline")
model_dir = args.model or minilm_path()


# ----------------------------------------------------------------------------------------------------------
# one run = one JSON
def run_path(task, method, budget, seed):
    budget_tag = "na" if method in ("dense", "adalora") else f"{budget:g}"
    return os.path.join(args.results_dir, task, f"{method}_b{budget_tag}_seed{seed}.json")


def compute_metrics_for(task):
    def compute(eval_pred):
        logits, labels = eval_pred
        preds = logits.argmax(-1)
        return {"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds),
                "mcc": matthews_corrcoef(labels, preds)}
    return compute


def training_args(output_dir, seed, learning_rate):
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=learning_rate, warmup_steps=0.06, weight_decay=0.01,
        seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no", logging_steps=20, report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
    )


def fine_tune(model, data, collator, task, seed, output_dir, callbacks=(), learning_rate=None):
    trainer = Trainer(model=model, args=training_args(output_dir, seed, learning_rate or args.learning_rate),
                      train_dataset=data["train"], eval_dataset=data["validation"], data_collator=collator,
                      compute_metrics=compute_metrics_for(task), callbacks=list(callbacks))
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def evaluate(model, data, collator, task, output_dir):
    trainer = Trainer(model=model, args=training_args(output_dir, 0, args.learning_rate),
                      eval_dataset=data["validation"], data_collator=collator,
                      compute_metrics=compute_metrics_for(task))
    metrics = trainer.evaluate()
    metrics = {k.removeprefix("eval_"): v for k, v in metrics.items()}
    return {k: metrics[k] for k in ("accuracy", "f1", "mcc")}


def latency_ms(model, repeats=2):
    """Median forward time of one batch of 32 x 128 tokens (inference mode, this process's threads)."""
    model.eval()
    ids = torch.randint(1000, 2000, (32, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def export_and_measure(model, modules, method, method_config, data, collator, task, work_dir):
    """Save, reload in one call, check the reload scores the same, and time it beside the dense model."""
    export_dir = os.path.join(work_dir, "export")
    save_compressed_model(model, export_dir, modules, method, method_config)
    reloaded = load_compressed_model(export_dir)
    layout = read_compression_config(export_dir) if modules else {"modules": {}}
    metrics = evaluate(reloaded, data, collator, task, work_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=get_task(task).num_labels)
    # Paired, alternating measurement: the CPU is shared, so the two are timed under the same load.
    dense_ms, exported_ms = [float("nan")], [float("nan")]
    if not args.skip_latency:
        dense_ms, exported_ms = [latency_ms(dense)], [latency_ms(reloaded)]
    target_dense = sum(l.weight.numel() for l in find_target_linears(dense).values())
    return metrics, {
        "targeted_dense_params": target_dense,
        "targeted_params": layout["compressed_params"] if modules else target_dense,
        "model_params": sum(p.numel() for p in reloaded.parameters()),
        "dense_model_params": sum(p.numel() for p in dense.parameters()),
        "latency_ms": statistics.median(exported_ms), "dense_latency_ms": statistics.median(dense_ms),
        "diagnostics": {n: e["diagnostics"] for n, e in layout["modules"].items() if "diagnostics" in e},
    }


def method_config_for(method, budget, total_steps=None, model=None):
    if method == "dense":
        return get_method("dense").make_config()
    if method == "adalora":
        return get_method("adalora").make_config(model=model, total_steps=total_steps)
    extra = {}
    if method == "rankdyna":
        extra["reallocation_interval"] = args.rankdyna_interval
    if method in ("fwsvd", "tfwsvd", "ars"):
        extra["max_fisher_batches"] = args.fisher_batches
    if method == "ars":
        extra["mask_steps"] = args.ars_steps
        extra["mask_learning_rate"] = args.ars_learning_rate
    if method == "tfwsvd":
        extra["als_iterations"] = args.als_iterations
    return get_method(method).make_config(target_budget=budget, **extra)


def config_dict(config):
    if isinstance(config, dict):
        return config
    to_dict = getattr(config, "to_dict", None)
    raw = to_dict() if to_dict else vars(config)
    return json.loads(json.dumps(raw, default=str))


def optimizer_steps(data):
    return int(np.ceil(len(data["train"]) / args.batch_size) * args.epochs)


def dense_model_dir(task, seed):
    return os.path.join(args.models_dir, task, f"dense_seed{seed}")


def run_one(task, method, budget, seed, data, collator):
    set_seed(seed)
    num_labels = get_task(task).num_labels
    work_dir = tempfile.mkdtemp(prefix=f"bench_{task}_{method}_")
    record = {"command": " ".join(sys.argv), "train_examples": len(data["train"]), "task": task, "method": method,
              "budget": None if method in ("dense", "adalora") else budget,
              "seed": seed, "epochs_per_round": args.epochs, "rounds": get_method(method).fine_tuning_rounds}
    try:
        spec = get_method(method)
        if spec.post_hoc:
            dense_record_path = run_path(task, "dense", None, seed)
            if not os.path.isfile(dense_record_path) or not os.path.isdir(dense_model_dir(task, seed)):
                raise RuntimeError(f"{method} needs the dense fine-tuned {task} model (seed {seed}): run dense first.")
            with open(dense_record_path) as f:
                first_round_s = json.load(f)["wall_time"]["fine_tune_s"]
            model = AutoModelForSequenceClassification.from_pretrained(dense_model_dir(task, seed))
            config = method_config_for(method, budget)
            loader = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                generator=torch.Generator().manual_seed(seed))
            start = time.perf_counter()
            modules = spec.compress(model, config, loader)
            compress_s = time.perf_counter() - start
            _, tune_s = fine_tune(model, data, collator, task, seed, work_dir)
            record["wall_time"] = {"first_round_s": first_round_s, "compress_s": compress_s, "fine_tune_s": tune_s,
                                   "total_s": first_round_s + compress_s + tune_s}
            record["ranks"] = {n: e.get("rank", min(e["in_features"], e["out_features"])) for n, e in modules.items()}
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
            config = method_config_for(method, budget, optimizer_steps(data), model)
            lr = args.adalora_learning_rate if method == "adalora" else args.learning_rate
            model, callbacks = spec.prepare(model, config)
            _, tune_s = fine_tune(model, data, collator, task, seed, work_dir, callbacks, lr)
            if method == "rankdyna":
                record["ranks"] = rank_pattern(model)
            if method == "adalora":
                record["ranks"] = adalora_rank_pattern(model)
                record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            start = time.perf_counter()
            model, modules = spec.export(model)
            export_s = time.perf_counter() - start
            record["wall_time"] = {"fine_tune_s": tune_s, "export_s": export_s, "total_s": tune_s + export_s}
            if method == "dense":
                model.save_pretrained(dense_model_dir(task, seed))
        metrics, measured = export_and_measure(model, modules, method, config_dict(config), data, collator, task,
                                               work_dir)
        record["metrics"] = metrics
        record.update(measured)
        record["config"] = config_dict(config)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(run_path(task, method, budget, seed)), exist_ok=True)
    with open(run_path(task, method, budget, seed), "w") as f:
        json.dump(record, f, indent=1)
    print(f"[done] {task} {method} b={budget} seed={seed}: {metrics} total {record['wall_time']['total_s']:.0f}s",
          flush=True)


def load_task(task, tokenizer):
    t = get_task(task)
    raw = load_glue(t, args.glue_dir, args.limit)

    def tokenize(batch):
        texts = [batch[c] for c in t.text_columns]
        return tokenizer(*texts, truncation=True, max_length=args.max_seq_length)

    if args.train_limit:
        raw["train"] = raw["train"].select(range(min(args.train_limit, len(raw["train"]))))
    return raw.map(tokenize, batched=True, remove_columns=list(t.text_columns)).rename_column("label", "labels")


# ----------------------------------------------------------------------------------------------------------
# the runs: dense first (the post-hoc methods start from it), then each budget across tasks, AdaLoRA last
if not args.report_only:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    collator = DataCollatorWithPadding(tokenizer)
    datasets_by_task = {task: load_task(task, tokenizer) for task in args.tasks}
    plan = [(t, "dense", None, s) for s in args.seeds for t in args.tasks if "dense" in args.methods]
    plan += [(t, m, b, s) for b in args.budgets for s in args.seeds for t in args.tasks for m in METHOD_ORDER
             if m in args.methods and m not in ("dense", "adalora")]
    plan += [(t, "adalora", None, s) for s in args.seeds for t in args.tasks if "adalora" in args.methods]
    for task, method, budget, seed in plan:
        if os.path.isfile(run_path(task, method, budget, seed)):
            print(f"[skip] {task} {method} b={budget} seed={seed}: already measured", flush=True)
            continue
        print(f"[run] {task} {method} b={budget} seed={seed}", flush=True)
        run_one(task, method, budget, seed, datasets_by_task[task], collator)


# ----------------------------------------------------------------------------------------------------------
# the report: every JSON found, grouped, with the command and versions
def read_records():
    records = []
    for root, _, files in os.walk(args.results_dir):
        for name in sorted(files):
            if name.endswith(".json") and name != "latency.json":
                with open(os.path.join(root, name)) as f:
                    records.append(json.load(f))
    return records


def versions():
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, commit {commit}, {platform.machine()} "
            f"({os.cpu_count()} CPUs visible)")


def majority_class_metric(task):
    """The dev metric of always predicting the most frequent training label: the floor a run must beat."""
    data = load_glue(task, args.glue_dir)
    labels = np.array(data["validation"]["label"])
    guess = np.full_like(labels, np.bincount(np.array(data["train"]["label"])).argmax())
    scores = {"accuracy": accuracy_score(labels, guess), "f1": f1_score(labels, guess),
              "mcc": matthews_corrcoef(labels, guess)}
    return 100 * scores[PRIMARY_METRIC.get(task, "accuracy")]


def write_report(records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ["rte", "mrpc", "cola", "sst2"] if any(r["task"] == t for r in records)]
    tasks += sorted({r["task"] for r in records} - set(tasks))
    rows = {}
    for r in records:
        rows.setdefault((r["method"], r["budget"]), {})[r["task"]] = r
    order = sorted(rows, key=lambda k: (-(k[1] or 1.01), METHOD_ORDER.index(k[0])))
    budgets = sorted({b for _, b in rows if b is not None}, reverse=True)
    expected = [(m, b) for b in budgets for m in METHOD_ORDER if m not in ("dense", "adalora")]
    expected = [("dense", None)] + expected + [("adalora", None)]

    lines = ["# GLUE benchmark: RankDyna against the baselines", "",
             "Generated by `scripts/benchmark_glue.py` — do not edit by hand. The runs below came from "
             "(one process per task, side by side, `OMP_NUM_THREADS=1 nice -n 10`):", "", "```"]
    lines += sorted({"python " + r["command"] for r in records if "command" in r})
    lines += ["python scripts/benchmark_glue.py --report_only", "```", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {versions()}.", ""]
    any_record = records[0] if records else {}
    seeds = sorted({r["seed"] for r in records})
    train_sizes = ", ".join(sorted({f"{r['task'].upper()} {r.get('train_examples', 'all')}" for r in records}))
    lines += [f"Model: packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384). Data: GLUE TSVs; training "
              f"examples used (first rows of train.tsv): {train_sizes}; dev sets in full. "
              f"Seeds: {seeds}. Epochs per fine-tuning round: {any_record.get('epochs_per_round')} (the same for "
              f"every method and round; post-hoc methods run two rounds). Batch 32, max length 128 "
              f"(dynamic padding), learning rate 1e-4 (AdaLoRA 1e-3, adapters). Device: CPU only — a shared "
              f"2-core machine that five agents used at the same time, one torch thread per run; no GPU was "
              f"available in this session. Wall times are therefore noisy (load from other processes "
              f"varied) and only roughly comparable between rows.", "",
              "Metric: RTE accuracy, MRPC F1, CoLA Matthews correlation, SST-2 accuracy, on the full dev set, "
              "x100. `params` = weights of the targeted matrices (attention q/k/v/o and both FFN matrices of "
              "every layer) after export, as a fraction of dense; biases, embeddings and the head are not "
              "counted (the same accounting as the budget). Wall time = every round the method needs "
              "(post-hoc: dense fine-tuning + compression + second fine-tuning), summed over the tasks of "
              "the row. Latency: median forward of a 32 x 128 batch of the exported, reloaded model, "
              "measured alternately with the dense model in the same process; shown as exported / dense.", ""]
    latency_file = os.path.join(args.results_dir, "latency.json")
    side_by_side = None
    if os.path.isfile(latency_file):
        with open(latency_file) as f:
            latency = json.load(f)
        side_by_side = latency["median_ms"]
        lines += [f"Latency column: every exported layout rebuilt and timed round-robin against dense in one process "
                  f"(`--latency_rounds {latency['rounds']}`, {latency['threads']} thread, median; dense "
                  f"{side_by_side['dense']:.0f} ms per 32 x 128 batch). One layout per method and budget: the rank "
                  f"pattern of its first run in task order ({', '.join(sorted({r['task'] for r in records})[:1])}"
                  f"); svd/fwsvd/tfwsvd share one layout, so their spread shows the timing noise. dense/adalora "
                  f"export dense models: 1.00.", ""]
    core = [t for t in ("rte", "mrpc") if t in tasks] or tasks  # the tasks every row is meant to have
    core_names = "+".join(t.upper() for t in core)
    header = ("| method | budget | " + " | ".join(t.upper() for t in tasks)
              + f" | avg {core_names} | params | wall time {core_names} (min) | latency vs dense |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    majority = {t: majority_class_metric(t) for t in tasks}
    lines.append("| *majority class* | — | " + " | ".join(f"*{majority[t]:.1f}*" for t in tasks)
                 + f" | *{np.mean([majority[t] for t in core]):.1f}* | — | — | — |")
    points = {t: {} for t in tasks}
    for key in order:
        method, budget = key
        by_task = rows[key]
        cells, values = [], []
        for t in tasks:
            r = by_task.get(t)
            if r is None:
                cells.append("missing")
                continue
            v = 100 * r["metrics"][PRIMARY_METRIC.get(t, "accuracy")]
            if t in core:
                values.append(v)
            cells.append(f"{v:.1f}")
            points[t].setdefault(method, []).append((r["targeted_params"] / r["targeted_dense_params"], v))
        complete = all(t in by_task for t in core)
        avg = f"{np.mean(values):.1f}" if complete else "—"
        any_r = next(iter(by_task.values()))
        fraction = any_r["targeted_params"] / any_r["targeted_dense_params"]
        wall = f"{sum(by_task[t]['wall_time']['total_s'] for t in core) / 60:.1f}" if complete else "—"
        if side_by_side and f"{method}@{budget}" in side_by_side:
            ratio = side_by_side[f"{method}@{budget}"] / side_by_side["dense"]
        elif side_by_side and method in ("dense", "adalora"):
            ratio = 1.0  # both export a plain dense model
        else:
            ratio = np.nanmean([r["latency_ms"] / r["dense_latency_ms"] for r in by_task.values()])
        lines.append(f"| {method} | {budget if budget is not None else '—'} | " + " | ".join(cells)
                     + f" | {avg} | {fraction:.3f} | {wall} | {ratio:.2f} |")
    dense_rows = rows.get(("dense", None), {})
    uninformative = [t.upper() for t in tasks if t in dense_rows
                     and 100 * dense_rows[t]["metrics"][PRIMARY_METRIC.get(t, "accuracy")] < majority[t] + 2]
    if uninformative:
        lines += ["", f"**Read with care:** on {', '.join(uninformative)} even dense fine-tuning did not beat the "
                  "majority-class floor by 2 points under this compute budget (few training examples, one "
                  "epoch), so differences between methods there are noise, not method quality."]
    missing = [f"{m} at budget {b}" if b is not None else m for m, b in expected if (m, b) not in rows]
    partial = [(f"{m} at budget {b}: " if b is not None else f"{m}: ")
               + ", ".join(t.upper() for t in tasks if t not in rows[(m, b)])
               for (m, b) in order if len(rows[(m, b)]) < len(tasks)]
    lines += ["", "## Missing", ""]
    if not missing and not partial:
        lines.append("Nothing: every method and budget has every listed task.")
    lines += [f"- {m}: not measured in time." for m in missing]
    lines += [f"- {p} not measured in time." for p in partial]
    not_run = [t.upper() for t in ("rte", "mrpc", "cola", "sst2") if t not in tasks]
    if not_run:
        lines.append(f"- {', '.join(not_run)}: not run at all (CPU time); the script runs them with "
                     f"`--tasks {' '.join(t.lower().replace('-', '') for t in not_run)}`.")

    lines += ["", "## Wall time per round (seconds)", "",
              "| method | budget | task | first round (dense) | compression | this method's fine-tuning | total |",
              "|---|---|---|---|---|---|---|"]
    for key in order:
        for t in tasks:
            if t not in rows[key]:
                continue
            w = rows[key][t]["wall_time"]
            budget = key[1] if key[1] is not None else "—"
            lines.append(f"| {key[0]} | {budget} | {t} | {w.get('first_round_s', 0):.0f} | "
                         f"{w.get('compress_s', 0):.0f} | {w['fine_tune_s']:.0f} | {w['total_s']:.0f} |")

    rank_lines = []
    for key in order:
        for t, r in rows[key].items():
            ranks = r.get("ranks")
            if ranks:
                values = list(ranks.values())
                rank_lines.append(f"| {key[0]} | {key[1] if key[1] is not None else '—'} | {t} | {min(values)} | "
                                  f"{int(np.median(values))} | {max(values)} | {sum(values)} |")
    lines += ["", "## Rank allocation (kept singular groups per matrix)", "",
              "AdaLoRA's ranks are those of its adapters (initial rank 12 per matrix, target average 8), not of "
              "the model's weights, which it leaves dense.", "",
              "| method | budget | task | min | median | max | total |", "|---|---|---|---|---|---|---|"] + rank_lines

    diag_lines = []
    for key in order:
        for t, r in rows[key].items():
            if r.get("diagnostics"):
                d = r["diagnostics"]
                excess = [v["svd_excess_error"] for v in d.values()]
                cv = [v["fisher_row_cv"] for v in d.values()]
                worst = max(d, key=lambda n: d[n]["svd_excess_error"])
                diag_lines.append(f"| {key[1]} | {t} | {np.median(excess):.2f} | {max(excess):.2f} (`{worst}`) | "
                                  f"{np.corrcoef(cv, excess)[0, 1]:.2f} |")
    if diag_lines:
        lines += ["", "## When plain SVD hurts (TFWSVD diagnostics)", "",
                  "`svd_excess_error` = Fisher-weighted reconstruction error of plain SVD / that of TFWSVD at the "
                  "same rank, per matrix (1 = SVD loses nothing on what the task's gradients weigh). The last "
                  "column correlates it with `fisher_row_cv` (spread of the rows' Fisher information), which is "
                  "known before factorizing (a correlation near 0 means it does not predict where SVD hurts). "
                  "Per-matrix values are in each run's JSON.", "",
                  "| budget | task | median excess | max excess (matrix) | corr(row-Fisher CV, excess) |",
                  "|---|---|---|---|---|"] + diag_lines

    os.makedirs(os.path.dirname(args.report), exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.report))[0]
    plot_name = "benchmark_glue.png" if stem == "RESULTS" else f"{stem}.png"
    plot_path = os.path.join(os.path.dirname(args.report), plot_name)
    if records:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
        colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHOD_ORDER)}
        for ax, t in zip(axes[0], tasks):
            for method, pts in sorted(points[t].items(), key=lambda kv: METHOD_ORDER.index(kv[0])):
                pts = sorted(pts)
                if method in ("dense", "adalora"):  # not compressed: a reference level
                    ax.axhline(pts[0][1], color=colors[method], linestyle="--", label=f"{method} (params 1.0)")
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[method], label=method)
            ax.axhline(majority[t], color="gray", linestyle=":", label="majority class")
            ax.set_xlabel("targeted parameters (fraction of dense)")
            ax.set_ylabel(f"{t.upper()} dev {PRIMARY_METRIC.get(t, 'accuracy')} x100")
            ax.set_title(f"MiniLM, {t.upper()}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        lines += ["", f"![metric vs parameters]({os.path.basename(plot_path)})", "",
                  "Plot: one panel per task, every measured run (`python scripts/benchmark_glue.py --report_only`)."]
    with open(args.report, "w") as f:
        f.write("\n".join(l for l in lines) + "\n")
    print(f"wrote {args.report}")


# ----------------------------------------------------------------------------------------------------------
# latency side by side: speed depends only on the layout, so rebuild each measured rank pattern and time all
# of them round-robin in this one process (the CPU load drifts; interleaving spreads it over every layout)
def layout_model(ranks):
    from rankdyna_trainer.budget import keeps_dense
    from rankdyna_trainer.export import LowRankLinear
    from rankdyna_trainer.targets import set_submodule

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    for name, linear in find_target_linears(model).items():
        r = ranks.get(name) if ranks else None
        if r is not None and not keeps_dense(r, linear.out_features, linear.in_features):
            set_submodule(model, name, LowRankLinear(linear.in_features, r, linear.out_features))
    return model.eval()


def measure_latency(records, rounds):
    layouts = {"dense": None}
    for r in sorted(records, key=lambda r: (r["method"], r["budget"] or 0, r["task"])):
        key = f"{r['method']}@{r['budget']}"
        if r["method"] not in ("dense", "adalora") and key not in layouts:
            layouts[key] = r["ranks"]
    models = {key: layout_model(ranks) for key, ranks in layouts.items()}
    times = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            times[key].append(latency_ms(model, repeats=1))
    result = {key: statistics.median(t) for key, t in times.items()}
    with open(os.path.join(args.results_dir, "latency.json"), "w") as f:
        json.dump({"rounds": rounds, "threads": args.threads, "median_ms": result}, f, indent=1)
    print("latency (ms):", json.dumps(result, indent=1))


if args.latency_rounds > 0:
    measure_latency([r for r in read_records() if "method" in r], args.latency_rounds)

if not args.no_report:
    write_report(read_records())
