"""GLUE benchmark: dense fine-tuning, RankDyna and the baselines on the packaged MiniLM, every budget and seed.

Every (task, method, budget, seed) run writes one JSON under --results_dir and is skipped when that file exists, so
the campaign resumes where it stopped, can be split (per task, seed or method) across processes and machines, and
each file can be committed as it lands (--git_commit). Post-hoc methods (svd, fwsvd, tfwsvd, ars) compress the dense
model fine-tuned with the same task and seed (kept under --models_dir; trained again if the folder is gone) and
their wall time counts that dense round too. rankdyna_equal is the rankdyna run given FWSVD's two rounds of
optimizer steps in one run (twice the round's epochs; rankdyna_trainer/experiment/glue_plan.py). Runs go to CUDA
when a GPU is visible, else the CPU.

After the runs (or with --report_only) the summary docs/results_glue.json and the page docs/RESULTS.md with its
plot are regenerated from every run file found. --latency_rounds times every exported layout against dense side
by side; --measure_cost times a training step per padded length and thread count and prices each task's epoch.

    python scripts/benchmark_glue.py                                   # the whole campaign (PROTOCOL below)
    python scripts/benchmark_glue.py --methods dense --seeds 42        # one slice
    python scripts/benchmark_glue.py --methods rankdyna_equal          # the equal-steps rows
    python scripts/benchmark_glue.py --latency_rounds 7 --no_runs      # exported speed against dense
    python scripts/benchmark_glue.py --measure_cost --no_runs          # CPU cost per step and epoch
    python scripts/benchmark_glue.py --report_only                     # summary + page from the files
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rankdyna_trainer.experiment import glue_plan, glue_report  # noqa: E402
from rankdyna_trainer.experiment.cpu_share import CpuShare  # noqa: E402
from rankdyna_trainer.experiment.glue_plan import (  # noqa: E402  (the plan lives in the package; named here too)
    TAKES_RANK_MULTIPLE,
    UNCOMPRESSED,
    method_tag,
    run_path,
)
from rankdyna_trainer.experiment.run_cost import RunCost, hook_seconds  # noqa: E402
from rankdyna_trainer.methods.rankdyna import RankDynaCallback  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# The protocol: one fine-tuning round per task, the same for every method and round. Chosen so that dense is
# clearly above the constant-prediction floor on each task (docs/RESULTS.md lists the measured floors); train_rows
# None = the full training set. SST-2 uses its first 8,000 rows: the full 67k would make every round 8x longer
# for a task dense already learns well (86.5 % on 8,000 rows, README).
PROTOCOL = {
    "sst2": {"train_rows": 8000, "epochs": 2.0, "max_seq_length": 64, "learning_rate": 1e-4},
    "mrpc": {"train_rows": None, "epochs": 3.0, "max_seq_length": 128, "learning_rate": 1e-4},
    "cola": {"train_rows": None, "epochs": 3.0, "max_seq_length": 64, "learning_rate": 1e-4},
    # RTE: 3 epochs left dense 2.9 points above the floor (55.6 vs 52.7, seed 42), 3 epochs at lr 2e-4 2.5; 6 epochs
    # at 1e-4 gave 57.8 (+5.1). Runs in benchmarks/glue_protocol_rte_choice/.
    "rte": {"train_rows": None, "epochs": 6.0, "max_seq_length": 128, "learning_rate": 1e-4},
}
SHARED = {
    "batch_size": 32, "warmup_ratio": 0.06, "weight_decay": 0.01,
    "sampling": "group_by_length",  # measured fastest on the CPU with the same scores (docs/RESULTS.md, cost)
    "adalora_learning_rate": 1e-3,  # adapters train at a higher rate
    "fisher_batches": 32, "ars_steps": 80, "ars_learning_rate": 1e-2, "als_iterations": 5,
    # Not passed: RankDynaConfig's reallocation_interval='auto' gives 10 on every task of this protocol
    # (tests/scripts/test_benchmark_glue.py checks it); kept so the protocol records stay comparable.
    "rankdyna_interval": 10,
}
PRIMARY_METRIC = {"sst2": "accuracy", "mrpc": "f1", "cola": "mcc", "rte": "accuracy"}
CAMPAIGN_RESULTS = os.path.join(REPO, "benchmarks", "glue_protocol")
CAMPAIGN_SUMMARY = os.path.join(REPO, "docs", "results_glue.json")
CAMPAIGN_PAGE = os.path.join(REPO, "docs", "RESULTS.md")
PROTOCOL_OVERRIDES = ("epochs", "learning_rate", "max_seq_length", "train_rows", "sampling")
RANKDYNA_SCHEDULE_FLAGS = ("rankdyna_warmup_fraction", "rankdyna_final_fraction")
RANKDYNA_DISTILLATION_FLAGS = ("rankdyna_distillation_weight", "rankdyna_distillation_temperature")


def parse_args(argv=None):
    from rankdyna_trainer.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(PROTOCOL), choices=sorted(PROTOCOL))
    parser.add_argument("--methods", nargs="+", default=glue_report.METHOD_ORDER,
                        choices=sorted(set(METHODS) - {"lorap", "mpo"} | set(glue_plan.EQUAL_WORK)),
                        help="rankdyna_equal: the rankdyna run with FWSVD's two rounds of steps in one run (twice the "
                        "round's epochs, --epochs included; rankdyna_trainer/experiment/glue_plan.py)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.33, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--rank_multiple", type=int, default=1,
                        help="keep ranks in multiples of this (rankdyna and the SVD baselines; counted in the budget)")
    parser.add_argument("--rankdyna_ffn_groups", default="channels", choices=["channels", "singular"],
                        help="RankDyna's FFN groups (RankDynaConfig.ffn_groups): 'channels' is what its default "
                        "'auto' gives on MiniLM, so it is not passed; 'singular' runs are named rankdyna+singular")
    parser.add_argument("--rankdyna_attention_groups", default="channels", choices=["channels", "singular"],
                        help="RankDyna's attention groups (RankDynaConfig.attention_groups): 'channels' (per-head q/k "
                        "and v/o channels) is what its default 'auto' gives on MiniLM, so it is not passed; "
                        "'singular' runs are named rankdyna+attn_singular")
    parser.add_argument("--rankdyna_warmup_fraction", type=float, default=None,
                        help="RankDyna's RankDynaConfig.warmup_fraction (share of steps before pruning starts); "
                        "default: the config's. A control, not the protocol: needs its own --results_dir")
    parser.add_argument("--rankdyna_final_fraction", type=float, default=None,
                        help="RankDyna's RankDynaConfig.final_fraction (share of steps trained at the final budget); "
                        "default: the config's. A control, not the protocol: needs its own --results_dir")
    parser.add_argument("--rankdyna_distillation_weight", type=float, default=None,
                        help="RankDyna's RankDynaConfig.distillation_weight (self-distillation from the model when "
                        "pruning starts; 0: off); default: the config's. A control: needs its own --results_dir")
    parser.add_argument("--rankdyna_distillation_temperature", type=float, default=None,
                        help="RankDyna's RankDynaConfig.distillation_temperature; default: the config's")
    parser.add_argument("--epochs", type=float, default=None,
                        help="override PROTOCOL's epochs for every task (the round of every method: rankdyna_equal "
                        "trains twice it, FWSVD it twice; a whole number with rankdyna_equal)")
    parser.add_argument("--learning_rate", type=float, default=None, help="override PROTOCOL's rate for every task")
    parser.add_argument("--max_seq_length", type=int, default=None, help="override PROTOCOL's length for every task")
    parser.add_argument("--train_rows", type=int, default=None, help="override PROTOCOL's training rows")
    parser.add_argument("--sampling", default=None, choices=["random", "group_by_length"],
                        help=f"training batch order (default {SHARED['sampling']})")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of every split (smoke tests only)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", os.path.join(REPO, "..", "shared", "data",
                                                                                         "glue")))
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--dense_clocks", default=os.path.join(REPO, "benchmarks", "glue_dense_retimed"),
                        help="dense runs re-timed beside re-run rows: the page's `x dense` ratios pair each run with "
                        "the dense run of its task and seed that finished closest to it (within 24 h), these included")
    parser.add_argument("--results_dir", default=CAMPAIGN_RESULTS)
    parser.add_argument("--models_dir", default=None,
                        help="where dense rounds are kept for the post-hoc methods (default: runs/benchmark_<name of "
                        "--results_dir>, so a control never starts from another folder's dense model)")
    parser.add_argument("--summary", default=CAMPAIGN_SUMMARY)
    parser.add_argument("--report", default=CAMPAIGN_PAGE)
    parser.add_argument("--git_commit", action="store_true", help="git-commit each run file as it is written")
    parser.add_argument("--same_process", action="store_true",
                        help="run every cell in this process (default: each in a fresh child process, one after the "
                        "other, so a run's time and memory do not depend on the runs before it: docs/cost.md)")
    parser.add_argument("--recorded_command", default=None, help=argparse.SUPPRESS)  # a child's parent command
    parser.add_argument("--no_runs", action="store_true", help="no fine-tuning (latency / cost / report only)")
    parser.add_argument("--report_only", action="store_true", help="only regenerate the summary and the page")
    parser.add_argument("--no_report", action="store_true")
    parser.add_argument("--latency_rounds", type=int, default=0,
                        help="time every layout (runs' rank patterns, uniform ranks) against dense, this many rounds")
    parser.add_argument("--latency_batch", type=int, default=32)
    parser.add_argument("--latency_seq_len", type=int, default=128)
    parser.add_argument("--latency_multiples", nargs="+", type=int, default=[8],
                        help="rank multiples whose layouts are timed beside the unrounded ones")
    parser.add_argument("--latency_patterns_from", default=None,
                        help="folder of run files whose rank patterns are timed (default: --results_dir)")
    parser.add_argument("--measure_cost", action="store_true", help="time training steps per length and threads")
    parser.add_argument("--cost_steps", type=int, default=5)
    args = parser.parse_args(argv)
    for budget in args.budgets:
        if not 0 < budget < 1:
            parser.error(f"--budgets takes fractions in (0, 1), got {budget}")
    try:
        glue_plan.check_whole_epochs(args.methods, args.epochs)
    except ValueError as error:
        parser.error(str(error))
    overrides = [f"--{name}" for name in PROTOCOL_OVERRIDES + RANKDYNA_SCHEDULE_FLAGS + RANKDYNA_DISTILLATION_FLAGS
                 if getattr(args, name) is not None]
    if overrides and os.path.abspath(args.results_dir) == CAMPAIGN_RESULTS and not (args.report_only or args.no_runs):
        parser.error(f"{' '.join(overrides)}: a protocol override; its runs must not land among the campaign's: "
                     f"give them their own --results_dir (e.g. benchmarks/glue_equal_time)")
    campaign_page = (os.path.abspath(args.summary) == CAMPAIGN_SUMMARY or os.path.abspath(args.report) == CAMPAIGN_PAGE)
    if os.path.abspath(args.results_dir) != CAMPAIGN_RESULTS and campaign_page and not args.no_report:
        parser.error(f"--results_dir {args.results_dir}: the campaign's page (docs/RESULTS.md, docs/results_glue.json) "
                     f"is made from benchmarks/glue_protocol only; add --no_report, or give --summary and --report")
    schedule = rankdyna_options(args)
    schedule.pop("ffn_groups", None)
    schedule.pop("attention_groups", None)
    if schedule:
        from rankdyna_trainer.methods.rankdyna import RankDynaConfig
        from rankdyna_trainer.methods.rankdyna.defaults import ENCODER, resolve_for_kind

        try:
            resolve_for_kind(RankDynaConfig(**schedule), ENCODER)  # with the defaults MiniLM gets
        except ValueError as error:
            given = " ".join(f"--rankdyna_{name} {value}" for name, value in schedule.items())
            parser.error(f"{given}: {error}")
    if args.models_dir is None:
        args.models_dir = os.path.join(REPO, "runs", "benchmark_" + os.path.basename(os.path.abspath(args.results_dir)))
    if args.rank_multiple < 1:
        parser.error(f"--rank_multiple must be an integer >= 1, got {args.rank_multiple}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device auto or cpu")
    return args


def device_of(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def device_record(device: str) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name}, {os.cpu_count()} cores visible"
    return {"type": device, "name": name, "threads": torch.get_num_threads()}


def versions() -> dict:
    import peft
    import transformers

    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "commit": commit}


def task_protocol(args, task: str) -> dict:
    """The settings of ``task``'s fine-tuning round: PROTOCOL, the shared settings and any command-line override."""
    protocol = {**PROTOCOL[task], **SHARED, "metric": PRIMARY_METRIC[task]}
    for name in PROTOCOL_OVERRIDES:
        if getattr(args, name) is not None:
            protocol[name] = getattr(args, name)
    if args.limit:
        protocol["limit"] = args.limit
    return protocol


# ----------------------------------------------------------------------------------------------------------
# one run = one JSON
def run_plan(args) -> list[tuple[str, str, float | None, int]]:
    return glue_plan.run_plan(args.tasks, args.methods, args.budgets, args.seeds)


def compute_metrics(eval_pred):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    logits, labels = eval_pred
    preds = logits.argmax(-1)
    return {"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds),
            "mcc": matthews_corrcoef(labels, preds), "top_class_fraction": float(np.bincount(preds).max() / len(preds))}


def training_args(output_dir, seed, protocol, learning_rate, device):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=protocol["epochs"], per_device_train_batch_size=protocol["batch_size"],
        per_device_eval_batch_size=64, learning_rate=learning_rate, warmup_steps=protocol["warmup_ratio"],
        weight_decay=protocol["weight_decay"], seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no",
        logging_steps=25, report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
        train_sampling_strategy=protocol["sampling"],
    )


def fine_tune(model, data, collator, seed, protocol, device, output_dir, callbacks=(), learning_rate=None):
    from transformers import Trainer

    trainer = Trainer(model=model, args=training_args(output_dir, seed, protocol,
                                                      learning_rate or protocol["learning_rate"], device),
                      train_dataset=data["train"], data_collator=collator, callbacks=list(callbacks))
    start = time.perf_counter()
    result = trainer.train()
    return time.perf_counter() - start, result.training_loss


def step_cost_record(cost, hook_seconds: list[float]) -> dict:
    """Where a fine-tune's time went: median step seconds at the start / middle / end of the run, split at the
    Trainer's hooks (``RunCost``), and RankDyna's own per-step work (empty for other methods), so a run's ``x dense``
    can be explained from its own file."""
    from rankdyna_trainer.experiment.run_cost import phase_step_seconds

    def phases(seconds):
        try:
            return phase_step_seconds(seconds)
        except ValueError:  # a run too short for three phases (a smoke run): its total only
            return {"total": sum(seconds)}

    return {"train_s": cost.train_seconds, "steps": len(cost.step_seconds), "step_s": phases(cost.step_seconds),
            "step_part_s": {part: phases(times) for part, times in cost.step_parts.items()},
            "rankdyna_hook_total_s": sum(hook_seconds),
            "every_step_ms": [round(1000 * t, 1) for t in cost.step_seconds],  # where in the schedule time goes
            "peak_rss_mib": cost.peak_bytes / 2 ** 20 if cost.memory_kind.startswith("peak_rss") else None}


def evaluate(model, data, collator, protocol, device, output_dir) -> dict:
    from transformers import Trainer

    trainer = Trainer(model=model, args=training_args(output_dir, 0, protocol, 1e-4, device),
                      eval_dataset=data["validation"], data_collator=collator, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    return {k: float(metrics[f"eval_{k}"]) for k in ("accuracy", "f1", "mcc", "top_class_fraction")}


def floor_of(task: str, data) -> dict:
    """The best constant prediction on the dev set: the floor every run must clear."""
    from rankdyna_trainer.experiment.glue_metrics import constant_prediction_floor, main_metric

    labels = np.array(data["validation"]["labels"])
    floor = constant_prediction_floor(task, labels)
    score = 100 * floor[main_metric(task)]
    return {"metric": PRIMARY_METRIC[task], "score": score,
            "dev_majority_class": int(np.bincount(labels).argmax())}


def method_config_for(method, budget, protocol, rank_multiple, total_steps=None, model=None, rankdyna_options=None):
    from rankdyna_trainer.methods import get_method

    if method == "dense":
        return get_method("dense").make_config()
    if method == "adalora":
        return get_method("adalora").make_config(model=model, total_steps=total_steps)
    extra = {"rank_multiple": rank_multiple}
    if method == "rankdyna":  # RankDynaConfig's defaults, and only the command line's RankDyna options
        extra.update(rankdyna_options or {})
    if method in ("fwsvd", "tfwsvd", "ars"):
        extra["max_fisher_batches"] = protocol["fisher_batches"]
    if method == "ars":
        extra["mask_steps"] = protocol["ars_steps"]
        extra["mask_learning_rate"] = protocol["ars_learning_rate"]
    if method == "tfwsvd":
        extra["als_iterations"] = protocol["als_iterations"]
    return get_method(method).make_config(target_budget=budget, **extra)


def rankdyna_options(args) -> dict:
    options = {"ffn_groups": "singular"} if args.rankdyna_ffn_groups == "singular" else {}
    if args.rankdyna_attention_groups == "singular":
        options["attention_groups"] = "singular"
    for flag in RANKDYNA_SCHEDULE_FLAGS + RANKDYNA_DISTILLATION_FLAGS:
        if getattr(args, flag) is not None:
            options[flag.removeprefix("rankdyna_")] = getattr(args, flag)
    return options


def config_dict(config):
    if isinstance(config, dict):
        return config
    to_dict = getattr(config, "to_dict", None)
    raw = to_dict() if to_dict else vars(config)
    return json.loads(json.dumps(raw, default=str))


def optimizer_steps(data, protocol):
    return int(np.ceil(len(data["train"]) / protocol["batch_size"]) * protocol["epochs"])


class Runner:
    """Holds what every run of one invocation shares: arguments, device, tokenized tasks, versions."""

    def __init__(self, args):
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from rankdyna_trainer.packaged_models import minilm_path

        self.args = args
        self.device = device_of(args)
        self.model_dir = args.model or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.collator = DataCollatorWithPadding(self.tokenizer)  # dynamic padding: each batch to its longest row
        self.data, self.protocols, self.floors = {}, {}, {}
        self.versions = versions()
        self.shapes, _ = target_shapes(self.model_dir)
        self.command = args.recorded_command or "python scripts/benchmark_glue.py " + " ".join(sys.argv[1:])

    def task_data(self, task):
        if task not in self.data:
            from rankdyna_trainer.experiment.glue_data import get_task, load_glue

            protocol = task_protocol(self.args, task)
            t = get_task(task)
            raw = load_glue(t, self.args.glue_dir, self.args.limit)
            if protocol["train_rows"]:
                raw["train"] = raw["train"].select(range(min(protocol["train_rows"], len(raw["train"]))))

            def tokenize(batch):
                texts = [batch[c] for c in t.text_columns]
                return self.tokenizer(*texts, truncation=True, max_length=protocol["max_seq_length"])

            data = raw.map(tokenize, batched=True, remove_columns=list(t.text_columns)).rename_column("label",
                                                                                                    "labels")
            protocol["train_rows_used"] = len(data["train"])
            self.data[task], self.protocols[task], self.floors[task] = data, protocol, floor_of(task, data)
        return self.data[task], self.protocols[task]

    def dense_model_dir(self, task, seed):
        return os.path.join(self.args.models_dir, task, f"dense_seed{seed}")

    def run_one(self, task, method, budget, seed):
        from transformers import AutoModelForSequenceClassification, set_seed

        from rankdyna_trainer.experiment.glue_data import get_task
        from rankdyna_trainer.methods import get_method

        data, protocol = self.task_data(task)
        args, device = self.args, self.device
        multiple = args.rank_multiple if method in TAKES_RANK_MULTIPLE else 1
        set_seed(seed)
        trained = glue_plan.trained_method(method)  # rankdyna_equal runs rankdyna with its config
        spec = get_method(trained)
        # The protocol stays the task's round (the page checks all of a task's files share one); a row with more
        # rounds of work trains them in one run of more epochs.
        run_protocol = {**protocol, "epochs": glue_plan.run_epochs(method, protocol["epochs"])}
        work_dir = tempfile.mkdtemp(prefix=f"bench_{task}_{method}_")
        cpu = CpuShare()
        record = {"task": task, "method": method, "budget": None if method in UNCOMPRESSED else budget,
                  "rank_multiple": multiple, "seed": seed, "protocol": protocol,
                  "rounds": spec.fine_tuning_rounds, "command": self.command}
        if method in glue_plan.EQUAL_WORK:
            record["equal_work"] = {"runs": trained, "protocol_rounds": glue_plan.rounds_of_work(method),
                                    "fwsvd_steps": glue_plan.fwsvd_steps(protocol)}
        try:
            if spec.post_hoc:
                first_round_s, origin = self.dense_round_for_post_hoc(task, seed)
                record["dense_model"] = origin
                model = AutoModelForSequenceClassification.from_pretrained(self.dense_model_dir(task, seed))
                if device == "cuda":
                    model.cuda()
                config = method_config_for(method, budget, protocol, multiple)
                loader = torch.utils.data.DataLoader(data["train"], batch_size=protocol["batch_size"], shuffle=True,
                                                     collate_fn=self.collator,
                                                     generator=torch.Generator().manual_seed(seed))
                start = time.perf_counter()
                modules = spec.compress(model, config, loader)
                compress_s = time.perf_counter() - start
                tune_s, loss = fine_tune(model, data, self.collator, seed, protocol, device, work_dir)
                record["wall_time"] = {"first_round_s": first_round_s, "compress_s": compress_s,
                                       "fine_tune_s": tune_s, "total_s": first_round_s + compress_s + tune_s}
                record["ranks"] = {n: e.get("rank", min(e["in_features"], e["out_features"]))
                                   for n, e in modules.items()}
            else:
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.model_dir, num_labels=get_task(task).num_labels)
                config = method_config_for(trained, budget, run_protocol, multiple,
                                           optimizer_steps(data, run_protocol), model, rankdyna_options(args))
                lr = protocol["adalora_learning_rate"] if method == "adalora" else protocol["learning_rate"]
                model, callbacks = spec.prepare(model, config)
                counter, cost = glue_plan.step_counter(), RunCost()  # last: its steps include the method's hooks
                with hook_seconds(RankDynaCallback, "on_pre_optimizer_step") as hook:
                    tune_s, loss = fine_tune(model, data, self.collator, seed, run_protocol, device, work_dir,
                                             [*callbacks, counter, cost], lr)
                record["step_cost"] = step_cost_record(cost, hook)
                config = getattr(model, "rankdyna_config", config)  # RankDyna's, resolved for this model and run
                record["epochs"], record["optimizer_steps"] = run_protocol["epochs"], counter.steps
                record["ranks"] = self.trained_ranks(trained, model)
                start = time.perf_counter()
                model, modules = spec.export(model)
                export_s = time.perf_counter() - start
                record["wall_time"] = {"fine_tune_s": tune_s, "export_s": export_s, "total_s": tune_s + export_s}
                if method == "dense":
                    model.save_pretrained(self.dense_model_dir(task, seed))
            record["train_loss"] = loss
            record.update(self.export_and_score(model, modules, trained, config, data, protocol, work_dir))
            record["config"] = config_dict(config)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        record["score"] = 100 * record["metrics"][PRIMARY_METRIC[task]]
        record["cpu_share"] = cpu.share()  # below 0.9: another job shared the cores, the clock is not comparable
        record["floor"] = self.floors[task]
        record["device"] = device_record(device)
        record["versions"] = self.versions
        record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        path = run_path(args.results_dir, task, method, budget, seed, multiple, args.rankdyna_ffn_groups,
                        args.rankdyna_attention_groups)
        write_json(path, record)
        tag = method_tag(method, multiple, args.rankdyna_ffn_groups, args.rankdyna_attention_groups)
        print(f"[done] {task} {tag} b={budget} seed={seed}: {record['score']:.1f} "
              f"(floor {record['floor']['score']:.1f}) in {record['wall_time']['total_s']:.0f}s", flush=True)
        if args.git_commit:
            commit_file(path, f"benchmark_glue: {task} {tag} b={budget} seed={seed}")
        return record

    @staticmethod
    def trained_ranks(method, model):
        if method == "rankdyna":
            from rankdyna_trainer.methods.rankdyna import rank_pattern

            return rank_pattern(model)
        if method == "adalora":
            from rankdyna_trainer.methods.adalora import adalora_rank_pattern

            return adalora_rank_pattern(model)
        return None

    def dense_round_for_post_hoc(self, task, seed) -> tuple[float, str]:
        """The dense round a post-hoc method starts from: its wall time and the saved model. The model is trained
        again with the same seed and protocol when its folder is gone (e.g. on a fresh GPU machine); the time is then
        that new round's, measured now beside the method's own, else the dense run file's."""
        dense_path = run_path(self.args.results_dir, task, "dense", None, seed)
        if not os.path.isfile(dense_path):
            raise RuntimeError(f"post-hoc methods need the dense {task} run of seed {seed}: add dense to --methods.")
        with open(dense_path) as f:
            first_round_s = json.load(f)["wall_time"]["fine_tune_s"]
        if os.path.isdir(self.dense_model_dir(task, seed)):
            return first_round_s, "saved dense model of this seed"
        from transformers import AutoModelForSequenceClassification, set_seed

        from rankdyna_trainer.experiment.glue_data import get_task

        data, protocol = self.task_data(task)
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir,
                                                                   num_labels=get_task(task).num_labels)
        work_dir = tempfile.mkdtemp(prefix=f"bench_{task}_dense_again_")
        try:
            start = time.perf_counter()
            fine_tune(model, data, self.collator, seed, protocol, self.device, work_dir)
            first_round_s = time.perf_counter() - start
            score = 100 * evaluate(model, data, self.collator, protocol, self.device, work_dir)[PRIMARY_METRIC[task]]
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        model.save_pretrained(self.dense_model_dir(task, seed))
        return first_round_s, (f"dense round trained again (saved model missing); its score {score:.2f}, its "
                               f"time the first round's")

    def export_and_score(self, model, modules, method, config, data, protocol, work_dir) -> dict:
        """Save, reload in one call and score the reloaded model: what a user of the exported folder gets."""
        from rankdyna_trainer.quantizer import load_compressed_model, read_compression_config, save_compressed_model

        export_dir = os.path.join(work_dir, "export")
        save_compressed_model(model, export_dir, modules, method, config_dict(config))
        reloaded = load_compressed_model(export_dir)
        layout = read_compression_config(export_dir) if modules else {"modules": {}}
        metrics = evaluate(reloaded, data, self.collator, protocol, self.device, work_dir)
        target_dense = sum(m * n for m, n in self.shapes.values())
        return {
            "metrics": metrics,
            "targeted_dense_params": target_dense,
            "targeted_params": layout["compressed_params"] if modules else target_dense,
            "model_params": sum(p.numel() for p in reloaded.parameters()),
            "diagnostics": {n: e["diagnostics"] for n, e in layout["modules"].items() if "diagnostics" in e},
        }


def write_json(path: str, data) -> None:
    """Write through a temporary file and rename, so a killed run never leaves a half-written (skipped) file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def commit_file(path: str, message: str, attempts: int = 5) -> None:
    """Commit one run file. A busy index (someone else's git command) is retried; a commit that still fails only
    warns: the run file is on disk, so the campaign goes on and the file can be committed by hand."""
    for attempt in range(attempts):
        added = subprocess.run(["git", "-C", REPO, "add", path], capture_output=True, text=True)
        done = added.returncode == 0 and subprocess.run(
            ["git", "-C", REPO, "commit", "-q", "-m", message, "--", path], capture_output=True, text=True
        ).returncode == 0
        if done:
            return
        time.sleep(2 * (attempt + 1))
    print(f"WARNING: could not git-commit {path}; the run file is kept, commit it by hand", file=sys.stderr)


def run_campaign(args, argv: list[str]) -> None:
    runner = None
    for task, method, budget, seed in run_plan(args):
        multiple = args.rank_multiple if method in TAKES_RANK_MULTIPLE else 1
        tag = method_tag(method, multiple, args.rankdyna_ffn_groups, args.rankdyna_attention_groups)
        if os.path.isfile(run_path(args.results_dir, task, method, budget, seed, multiple, args.rankdyna_ffn_groups,
                                   args.rankdyna_attention_groups)):
            print(f"[skip] {task} {tag} b={budget} seed={seed}: already measured", flush=True)
            continue
        print(f"[run] {task} {tag} b={budget} seed={seed}", flush=True)
        if args.same_process:
            runner = runner or Runner(args)
            runner.run_one(task, method, budget, seed)
        else:
            run_in_child(argv, task, method, budget, seed)


def run_in_child(argv: list[str], task: str, method: str, budget: float | None, seed: int) -> None:
    """One cell in a fresh Python process. A RankDyna run leaves the process's heap larger and its later runs slower
    (docs/cost.md), so runs sharing a process would be timed against what ran before them. The child gets this
    command's options with the cell's own appended (argparse keeps the last), records this command, and writes its
    run file as a run in this process would."""
    cell = ["--tasks", task, "--methods", method, "--seeds", str(seed), "--same_process",
            "--recorded_command", "python scripts/benchmark_glue.py " + " ".join(argv)]
    if budget is not None:
        cell += ["--budgets", f"{budget:g}"]
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, *cell])
    if done.returncode != 0:
        raise SystemExit(f"benchmark_glue.py: the run of {task} {method} budget {budget} seed {seed} failed in its "
                         f"own process (exit code {done.returncode}); its error is above. Rerunning the command "
                         "resumes from the files written so far.")


# ----------------------------------------------------------------------------------------------------------
# exported speed: latency depends on the layout alone, so rebuild each rank pattern on the pre-trained weights and
# time every layout round-robin in this one process (interleaving spreads drifting machine load over all of them)
def target_shapes(model_dir) -> tuple[dict[str, tuple[int, int]], dict[str, list[str]]]:
    """Each targeted matrix's ``(out, in)`` shape, and each channel reader -> the layers writing its channels: FFN
    output layers -> their input layers (RankDyna's ``ffn_groups='channels'``) and, on BERT/RoBERTa, each attention's
    query -> key (q/k channels) and output -> value (v/o channels; ``attention_groups='channels'``)."""
    from transformers import AutoModelForSequenceClassification

    from rankdyna_trainer.targets import (
        ffn_channel_layers,
        find_target_linears,
        has_table_roles,
        linear_weight,
        table_roles,
    )

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    targets = find_target_linears(model)
    shapes = {n: tuple(linear_weight(l).shape) for n, l in targets.items()}
    readers = {}
    if has_table_roles(model):
        readers = ffn_channel_layers(model, table_roles(model, "the latency layouts", "a known model type"))
    return shapes, {**readers, **attention_readers(model, targets)}


def attention_blocks(model, targets) -> list:
    """The attentions that can take channels (``rankdyna.attention.AttentionBlock``: BERT/RoBERTa), else none."""
    from rankdyna_trainer.methods.rankdyna.attention import attention_channel_blocks, supports_channels

    return attention_channel_blocks(model, targets) if supports_channels(model) else []


def attention_readers(model, targets) -> dict[str, list[str]]:
    """Each attention's query -> [key] and output -> [value] (its q/k and v/o channel pairs), where channels apply."""
    return {reader: [producer] for b in attention_blocks(model, targets)
            for reader, producer in ((b.query, b.key), (b.output, b.value))}


def channel_ffns(ranks: dict[str, int] | None, ffns: dict[str, list[str]]) -> dict[str, list[str]]:
    """The channel readers (FFN outputs, attention queries and outputs) a rank pattern keeps by channels: its entry
    for the reader counts the kept channels and the layers writing them have no entry (sliced with it, not
    factorized)."""
    if not ranks:
        return {}
    return {out: ins for out, ins in ffns.items() if out in ranks and not any(i in ranks for i in ins)}


def channel_cost(out: str, ins: list[str], shapes: dict) -> int:
    """Weights one kept channel costs: a row of every input layer and a column of the output layer (an attention's
    q/k channel: a row of the key and, the query square, as many weights of the query)."""
    return sum(shapes[i][1] for i in ins) + shapes[out][0]


def uniform_ranks(shapes: dict, budget: float, multiple: int) -> dict[str, int]:
    """The ranks svd/fwsvd/tfwsvd keep at ``budget`` (near-uniform), in multiples of ``multiple``."""
    from rankdyna_trainer.budget import allocate_groups
    from rankdyna_trainer.factorize import budget_params, uniform_rank_scores

    keep = allocate_groups(uniform_rank_scores(list(shapes.values())), list(shapes.values()),
                           budget_params(list(shapes.values()), budget), rank_multiple=multiple)
    return {n: int(k.sum()) for n, k in zip(shapes, keep)}


def rounded_ranks(ranks: dict[str, int], shapes: dict, budget: float, multiple: int,
                  ffns: dict[str, list[str]]) -> dict[str, int]:
    """A measured rank pattern re-allocated in blocks of ``multiple`` under the same budget: kept FFN channels round
    down to a multiple, then each matrix group scores its distance below its matrix's measured rank, so ranks round
    to nearby multiples where the rest of the budget allows."""
    from rankdyna_trainer.budget import allocate_groups
    from rankdyna_trainer.factorize import budget_params

    channels = channel_ffns(ranks, ffns)
    rounded = {out: ranks[out] // multiple * multiple for out in channels}
    budget_left = budget_params(list(shapes.values()), budget) - sum(
        rounded[out] * channel_cost(out, ins, shapes) for out, ins in channels.items())
    sliced = set(channels) | {i for ins in channels.values() for i in ins}
    names = [n for n in shapes if n not in sliced]
    if not names:  # every matrix kept by channels (FFN and attention channels)
        return rounded
    scores = [ranks[n] - torch.arange(min(shapes[n]), dtype=torch.float32) for n in names]
    keep = allocate_groups(scores, [shapes[n] for n in names], budget_left, rank_multiple=multiple)
    return {**rounded, **{n: int(k.sum()) for n, k in zip(names, keep)}}


def layout_model(model_dir, ranks: dict[str, int] | None, ffns: dict[str, list[str]], device: str):
    """The pre-trained model with the layout of ``ranks``: kept FFN channels as smaller dense layers, kept attention
    channels as the exported model has them (scattered q/k/v, gathered output; which dims of a head are kept does not
    change the cost), low-rank pairs where a rank is below break-even (weights are irrelevant to speed)."""
    from transformers import AutoModelForSequenceClassification

    from rankdyna_trainer.budget import keeps_dense
    from rankdyna_trainer.export import GatheredLinear, LowRankLinear, ScatteredLinear
    from rankdyna_trainer.targets import find_target_linears, set_submodule

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    targets = find_target_linears(model)
    channels = channel_ffns(ranks, ffns)
    blocks = attention_blocks(model, targets)
    queries, outputs = {b.query for b in blocks}, {b.output for b in blocks}
    for out, ins in channels.items():
        kept = list(range(ranks[out]))
        if out in queries | outputs and len(kept) == targets[out].out_features:
            continue  # every dim kept: export_model keeps the plain layers
        for name in ins:
            layer = targets[name]
            set_submodule(model, name, ScatteredLinear(layer.in_features, kept, layer.out_features)
                          if out in queries | outputs else torch.nn.Linear(layer.in_features, ranks[out]))
        layer = targets[out]
        if out in queries:
            set_submodule(model, out, ScatteredLinear(layer.in_features, kept, layer.out_features))
        elif out in outputs:
            set_submodule(model, out, GatheredLinear(kept, layer.in_features, layer.out_features))
        else:
            set_submodule(model, out, torch.nn.Linear(ranks[out], layer.out_features))
    sliced = set(channels) | {i for ins in channels.values() for i in ins}
    for name, linear in targets.items():
        r = ranks.get(name) if ranks else None
        if name not in sliced and r is not None and not keeps_dense(r, linear.out_features, linear.in_features):
            set_submodule(model, name, LowRankLinear(linear.in_features, r, linear.out_features))
    return model.to(device).eval()


def params_fraction(ranks: dict[str, int] | None, shapes: dict, ffns: dict[str, list[str]]) -> float:
    from rankdyna_trainer.budget import matrix_cost

    if not ranks:
        return 1.0
    channels = channel_ffns(ranks, ffns)
    sliced = {i for ins in channels.values() for i in ins}
    kept = sum(ranks[out] * channel_cost(out, ins, shapes) for out, ins in channels.items())
    kept += sum(matrix_cost(ranks[n], m, k) for n, (m, k) in shapes.items() if n not in sliced and n not in channels)
    return kept / sum(m * k for m, k in shapes.values())


def latency_layouts(args, records, shapes, ffns) -> dict[str, tuple[dict | None, int]]:
    """Layouts to time: dense, near-uniform ranks at every budget (with and without each rank multiple), and the
    first run file's rank pattern of every trained method and budget, with its rounded variants."""
    layouts = {"dense": (None, 1)}
    for budget in args.budgets:
        for multiple in [1] + args.latency_multiples:
            suffix = f"+m{multiple}" if multiple > 1 else ""
            layouts[f"uniform{suffix}@{budget:g}"] = (uniform_ranks(shapes, budget, multiple), multiple)
    seen = set()
    for r in sorted(records, key=lambda r: (glue_report.TASK_ORDER.index(r["task"]), r["seed"])):
        if r["method"] not in ("rankdyna", "ars") or not r.get("ranks"):
            continue  # svd/fwsvd/tfwsvd share the uniform layout above
        key = glue_report.run_key(r)
        if key in seen:
            continue
        seen.add(key)
        layouts[f"{key} ({r['task']})"] = (r["ranks"], r.get("rank_multiple", 1))
        if r.get("rank_multiple", 1) == 1:
            for multiple in args.latency_multiples:
                rounded = rounded_ranks(r["ranks"], shapes, r["budget"], multiple, ffns)
                layouts[f"{key} ({r['task']}) rounded +m{multiple}"] = (rounded, multiple)
    return layouts


def rank_pattern_records(folder: str) -> list[dict]:
    """Run files with a rank pattern (any protocol: a layout's speed depends on its ranks alone)."""
    records = []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".json") and name not in ("latency.json", "cost.json", "notes.json"):
                record = read_optional(os.path.join(root, name))
                if isinstance(record, dict) and record.get("ranks") and record.get("budget"):
                    records.append(record)
    return records


@torch.inference_mode()
def time_forward(model, ids, mask, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=mask)
    if device == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


MATMUL_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                  "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_flash_attention")


def matmul_time_share(model, ids, mask) -> dict:
    """One profiled forward: milliseconds in matmul kernels (GEMMs and the attention kernel) and in everything else
    (softmax, GELU, layer norm, embeddings, copies). Only the matmul part can shrink with the ranks, so
    dense_ms / (other_ms + matmul_ms / ideal) bounds the speed-up any low-rank layout can reach (Amdahl)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1000
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_KERNELS) / 1000
    return {"matmul_ms": matmul, "other_ms": total - matmul}


def measure_latency(args, records) -> dict:
    from rankdyna_trainer.flops import forward_flops
    from rankdyna_trainer.packaged_models import minilm_path

    device = device_of(args)
    model_dir = args.model or minilm_path()
    shapes, ffns = target_shapes(model_dir)
    layouts = latency_layouts(args, records, shapes, ffns)
    models = {name: layout_model(model_dir, ranks, ffns, device) for name, (ranks, _) in layouts.items()}
    ids = torch.randint(1000, 2000, (args.latency_batch, args.latency_seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    for model in models.values():  # warm-up: allocator, kernels, caches
        time_forward(model, ids, mask, device)
    times = {name: [] for name in models}
    for _ in range(args.latency_rounds):
        for name, model in models.items():
            times[name].append(time_forward(model, ids, mask, device))
    profiles = {name: matmul_time_share(model, ids, mask) for name, model in models.items()} if device == "cpu" else {}
    result = {
        "command": "python scripts/benchmark_glue.py " + " ".join(sys.argv[1:]),
        "rounds": args.latency_rounds, "batch_size": args.latency_batch, "seq_len": args.latency_seq_len,
        "device": f"{device_record(device)['type']} ({device_record(device)['name']})",
        "threads": torch.get_num_threads(), "versions": versions(),
        "layouts": {name: {"ranks": layouts[name][0], "rank_multiple": layouts[name][1],
                           "params_fraction": params_fraction(layouts[name][0], shapes, ffns),
                           "flops": forward_flops(models[name], args.latency_batch, args.latency_seq_len),
                           "median_ms": statistics.median(times[name]), "all_ms": times[name],
                           "profile": profiles.get(name)}
                    for name in models},
    }
    write_json(os.path.join(args.results_dir, "latency.json"), result)
    for name, entry in result["layouts"].items():
        dense = result["layouts"]["dense"]
        speedup, ideal = dense["median_ms"] / entry["median_ms"], dense["flops"] / entry["flops"]
        print(f"{name:45s} {entry['median_ms']:8.1f} ms  speed-up {speedup:.2f}  ideal {ideal:.2f}  "
              f"fraction {speedup / ideal:.2f}  profile {entry['profile']}", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# CPU cost: a training step per padded length and thread count, then each task's epoch under each batching setting
def step_seconds(model_dir, lengths, threads, steps, batch_size) -> list[float]:
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    result = []
    for length in lengths:
        batch = {"input_ids": torch.randint(1000, 20000, (batch_size, length)),
                 "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
                 "labels": torch.randint(0, 2, (batch_size,))}
        times = []
        for step in range(steps + 2):  # two warm-up steps
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                times.append(time.perf_counter() - start)
        result.append(statistics.median(times))
    return result


def batch_lengths(lengths: list[int], batch_size: int, setting: str, max_length: int, seed: int = 42) -> list[int]:
    """Padded length of every batch of one epoch: padding to max_length, or dynamic (each batch to its longest row)
    with random batches or with transformers' LengthGroupedSampler."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if setting == "pad to max length":
        return [max_length] * int(np.ceil(len(lengths) / batch_size))
    generator = torch.Generator().manual_seed(seed)
    if setting == "dynamic, random batches":
        order = torch.randperm(len(lengths), generator=generator).tolist()
    else:
        order = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))
    return [max(lengths[i] for i in order[s:s + batch_size]) for s in range(0, len(order), batch_size)]


def measure_cost(args) -> dict:
    runner = Runner(args)
    threads_before = torch.get_num_threads()
    lengths = [16, 32, 64, 128]
    thread_counts = sorted({1, min(2, os.cpu_count() or 1)})
    step_s = {str(t): step_seconds(runner.model_dir, lengths, t, args.cost_steps, SHARED["batch_size"])
              for t in thread_counts}
    settings = ["pad to max length", "dynamic, random batches", "dynamic, group_by_length"]
    epochs = {}
    for task in args.tasks:
        data, protocol = runner.task_data(task)
        row_lengths = [len(ids) for ids in data["train"]["input_ids"]]
        epochs[task] = {}
        for setting in settings:
            batches = batch_lengths(row_lengths, protocol["batch_size"], setting, protocol["max_seq_length"])
            epochs[task][setting] = {
                "mean_length": float(np.mean(batches)),
                "epoch_s": {t: float(sum(np.interp(batches, lengths, s))) for t, s in step_s.items()},
            }
    torch.set_num_threads(threads_before)
    result = {"command": runner.command, "device": f"cpu ({device_record('cpu')['name']})",
              "batch_size": SHARED["batch_size"], "steps": args.cost_steps, "lengths": lengths, "step_s": step_s,
              "epochs": epochs, "versions": runner.versions}
    write_json(os.path.join(args.results_dir, "cost.json"), result)
    print(json.dumps({"step_s": step_s, "epochs": epochs}, indent=1), flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# the summary and the page, from the files alone
def read_optional(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def write_summary_and_report(args) -> dict:
    records = glue_report.read_run_files(args.results_dir)
    summary = glue_report.summarize(records)
    write_json(args.summary, summary)
    report_dir = os.path.dirname(os.path.abspath(args.report))
    plot_name = os.path.splitext(os.path.basename(args.summary))[0] + "_retention.png"
    glue_report.plot_retention(summary, os.path.join(report_dir, plot_name))
    latency = read_optional(os.path.join(args.results_dir, "latency.json"))
    cost = read_optional(os.path.join(args.results_dir, "cost.json"))
    notes = read_optional(os.path.join(args.results_dir, "notes.json"))
    clocks = glue_report.read_run_files(args.dense_clocks) if os.path.isdir(args.dense_clocks) else []
    page = glue_report.render_report(summary, records, plot_name, os.path.relpath(args.summary, REPO),
                                     latency=latency, cost=cost, budgets=args.budgets, notes=notes,
                                     dense_clocks=[r for r in clocks if r["method"] == "dense"])
    with open(args.report, "w") as f:
        f.write(page)
    print(f"wrote {args.summary}, {args.report} and {plot_name} from {len(records)} run files", flush=True)
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.recorded_command:  # a child of run_in_child: its one cell, nothing else
        run_campaign(args, argv)
        return
    if not args.report_only:
        if args.measure_cost:
            measure_cost(args)
        if not args.no_runs:
            run_campaign(args, argv)
        if args.latency_rounds > 0:
            measure_latency(args, rank_pattern_records(args.latency_patterns_from or args.results_dir))
    if not args.no_report:
        write_summary_and_report(args)


if __name__ == "__main__":
    main()
