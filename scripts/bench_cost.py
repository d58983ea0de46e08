"""Cost of a RankDyna run against the dense fine-tune it replaces, side by side: wall time, step times, peak memory.

Each run is its own process, one after the other (no two runs sharing the cores). Every cell runs twice: a timed
run as a user runs it, and a shorter memory run with ``MALLOC_MMAP_THRESHOLD_=131072``, which puts large tensors on
mmap so a freed one goes back to the OS at once and the peak RSS measures live memory (glibc otherwise keeps freed
heap, more of it with the changing shapes of a pruning run); that setting costs page faults on every large
allocation, so it would distort the timed run:

* ``minilm``: the README's main job (``scripts/run_glue.py``: packaged MiniLM, SST-2, 8,000 rows, 2 epochs, length
  64, batch 32, lr 1e-4, train + export + reload + full dev set), dense and with ``--rankdyna --rankdyna_budget B``;
* ``smollm2``: a causal-LM fine-tune of the packaged SmolLM2-135M on SST-2 sentences packed into blocks, dense and
  with the default ``RankDynaConfig(target_budget=B)`` and 32 training blocks as calibration for its whitened start;
  the whole run counts ``prepare_model`` (calibration pass and factorization).

After a model's RankDyna runs its dense run is timed once more (``repeat``): the ratios divide by the mean of the
two dense runs, so that a machine whose speed drifts during the benchmark does not tilt them (the two dense rows show
by how much it drifted). Every run writes one JSON under ``--results_dir`` and is skipped when it exists (``--force``
reruns), so the benchmark resumes. ``docs/cost.json`` (RankDyna over dense: whole-run ratio per budget on MiniLM,
peak-memory ratio per model) and ``docs/cost.md`` are rebuilt from the run files after each run.

    python scripts/bench_cost.py                      # both models, budgets 0.5 0.33 0.2
    python scripts/bench_cost.py --report_only

``--rankdyna_attention_groups singular`` (or ``channels``) passes the same flag to MiniLM's RankDyna runs
(``run_glue.py``; the default ``auto`` takes per-head q/k and v/o channels on MiniLM); it needs its own
``--results_dir``, ``--json`` and ``--out`` so that its runs and report stay apart from the default's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

MAIN_JOB = ("--model_name_or_path minilm --task_name sst2 --do_train --do_eval --max_train_samples {rows} "
            "--num_train_epochs 2 --max_seq_length 64 --per_device_train_batch_size 32 --per_device_eval_batch_size 64 "
            "--learning_rate 1e-4 --logging_steps 25 --save_strategy no --seed 42 --report_to none "
            "--disable_tqdm true")
LM_CALIBRATION_BLOCKS = 32  # as benchmark_lm.py calibrates the whitened start
TARGETS = {"run_ratio": {"0.5": 0.95, "0.33": 0.8, "0.2": 0.7}, "peak_memory_ratio": {"minilm": 1.1}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.33, 0.2])
    parser.add_argument("--train_rows", type=int, default=8000, help="MiniLM: SST-2 training rows (main job: 8000)")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", os.path.join(REPO, "..", "shared", "data",
                                                                                      "glue")))
    parser.add_argument("--memory_rows", type=int, default=960, help="MiniLM memory run: SST-2 training rows")
    parser.add_argument("--lm_steps", type=int, default=40, help="SmolLM2: optimizer steps")
    parser.add_argument("--lm_memory_steps", type=int, default=20, help="SmolLM2 memory run: optimizer steps")
    parser.add_argument("--lm_batch_size", type=int, default=2)
    parser.add_argument("--lm_seq_len", type=int, default=128)
    parser.add_argument("--results_dir", default=os.path.join(REPO, "benchmarks", "cost"))
    parser.add_argument("--json", default=os.path.join(REPO, "docs", "cost.json"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "cost.md"))
    parser.add_argument("--rankdyna_attention_groups", default="auto", choices=["auto", "singular", "channels"],
                        help="MiniLM's RankDyna runs: RankDynaConfig.attention_groups (run_glue.py's flag; 'auto', "
                        "the default, is channels on MiniLM); another value needs its own --results_dir, --json and "
                        "--out, and 'channels' --models minilm")
    parser.add_argument("--force", action="store_true", help="rerun runs whose result file exists")
    parser.add_argument("--report_only", action="store_true", help="rebuild --json and --out from the run files")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: "model:budget" measured in this process
    args = parser.parse_args(argv)
    for budget in args.budgets:
        if not 0 < budget < 1:
            parser.error(f"--budgets: each budget must be in (0, 1), got {budget}")
    for flag in ("train_rows", "memory_rows", "lm_steps", "lm_memory_steps", "lm_batch_size", "lm_seq_len"):
        if getattr(args, flag) < 1 or (flag in ("lm_steps", "lm_memory_steps") and getattr(args, flag) < 10):
            parser.error(f"--{flag} must be a positive integer (step counts at least 10), got {getattr(args, flag)}")
    if args.rankdyna_attention_groups != "auto":
        if args.rankdyna_attention_groups == "channels" and "smollm2" in args.models:
            parser.error("--rankdyna_attention_groups channels: BERT-style attention only; use --models minilm")
        shared = [flag for flag in ("results_dir", "json", "out") if getattr(args, flag) == parser.get_default(flag)]
        if shared:
            parser.error(f"--rankdyna_attention_groups {args.rankdyna_attention_groups} needs its own "
                         f"{', '.join('--' + f for f in shared)} "
                         "(the default ones hold the default runs and report)")
    if not args.report_only and not os.path.isdir(args.glue_dir):
        parser.error(f"--glue_dir {args.glue_dir} is not a folder (the GLUE TSVs; or set $GLUE_DIR)")
    return args


def run_name(model: str, budget: float | None, kind: str = "time") -> str:
    name = f"{model}_{'dense' if budget is None else f'rankdyna_b{budget:g}'}"
    return name if kind == "time" else f"{name}_{kind}"


# -- one run, in a child process ------------------------------------------------------------------------------------
def measure_minilm(args, budget: float | None, memory: bool) -> dict:
    import run_glue

    from rankdyna_trainer import RankDynaCallback
    from rankdyna_trainer.experiment.run_cost import RunCost, hook_seconds

    with tempfile.TemporaryDirectory() as out, hook_seconds(RankDynaCallback, "on_pre_optimizer_step") as hook:
        rows = args.memory_rows if memory else args.train_rows
        argv = shlex.split(MAIN_JOB.format(rows=rows)) + ["--glue_dir", args.glue_dir, "--output_dir", out]
        if budget is not None:
            argv += ["--rankdyna", "--rankdyna_budget", str(budget)]
            if args.rankdyna_attention_groups != "auto":
                argv += ["--rankdyna_attention_groups", args.rankdyna_attention_groups]
        cost = RunCost()
        start = time.perf_counter()
        results = run_glue.main(argv, extra_callbacks=[cost])
        wall = time.perf_counter() - start
        disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    return {**cost.summary(), **rankdyna_hook(hook), "wall_seconds": wall,
            "command": "python scripts/run_glue.py " + shlex.join(argv[:-2]),
            "metric": results["eval"].get("eval_accuracy"), "quality": results.get("quality"),
            "compression": results.get("compression"), "model_bytes_on_disk": disk}


def rankdyna_hook(seconds: list[float]) -> dict:
    """RankDyna's per-step work (its ``on_pre_optimizer_step``: scoring, and reallocation on reallocation steps) at
    the start, middle and end of the run; empty for a dense run."""
    from rankdyna_trainer.experiment.run_cost import phase_step_seconds

    return {"rankdyna_hook_seconds": phase_step_seconds(seconds), "rankdyna_hook_total_seconds": sum(seconds)} \
        if seconds else {}


def lm_blocks(args, tokenizer, n: int):
    from rankdyna_trainer.experiment.glue_data import load_glue

    text = " ".join(load_glue("sst2", args.glue_dir)["train"]["sentence"][:20000])
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[i * args.lm_seq_len:(i + 1) * args.lm_seq_len] for i in range(n)]
    if len(blocks[-1]) < args.lm_seq_len:
        raise ValueError(f"Not enough SST-2 text for {n} blocks of {args.lm_seq_len} tokens.")
    return blocks


def measure_smollm2(args, budget: float | None, memory: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
    from rankdyna_trainer.experiment.run_cost import RunCost, hook_seconds
    from rankdyna_trainer.methods.rankdyna import kept_params
    from rankdyna_trainer.packaged_models import smollm2_path

    set_seed(0)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    steps = args.lm_memory_steps if memory else args.lm_steps
    blocks = lm_blocks(args, tokenizer, max(steps * args.lm_batch_size, LM_CALIBRATION_BLOCKS))
    callbacks = []
    start = time.perf_counter()  # the run includes the factorization and its calibration pass
    if budget is not None:
        config = RankDynaConfig(target_budget=budget)
        # The decoder default starts from the whitened SVD, which needs calibration text (without it the library
        # falls back to the plain SVD, with a warning): the first training blocks, as a user would pass.
        calibration = [{"input_ids": torch.tensor(blocks[i:i + 4])} for i in range(0, LM_CALIBRATION_BLOCKS, 4)]
        prepare_model(model, config, calibration_batches=calibration)
        callbacks = [RankDynaCallback(config)]
    blocks = blocks[:steps * args.lm_batch_size]
    cost = RunCost()
    with tempfile.TemporaryDirectory() as out, hook_seconds(RankDynaCallback, "on_pre_optimizer_step") as hook:
        training_args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=args.lm_batch_size,
                                          learning_rate=5e-5, save_strategy="no", report_to="none", use_cpu=True,
                                          disable_tqdm=True, logging_steps=10, seed=0)
        train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
        trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=callbacks + [cost])
        train_loss = trainer.train().training_loss
    record = {**cost.summary(), **rankdyna_hook(hook), "wall_seconds": time.perf_counter() - start,
              "train_loss": train_loss}
    if budget is not None:
        layers = list(callbacks[0]._layers)
        record["kept_fraction"] = kept_params(layers) / callbacks[0].budget.dense_params
        record["init"] = model.rankdyna_config.init  # the resolved start: 'whitened' is the decoder default
    return record


def child(args) -> None:
    import torch

    model, budget, kind = args.child.split(":")
    budget = None if budget == "dense" else float(budget)
    measure = measure_minilm if model == "minilm" else measure_smollm2
    record = {"model": model, "budget": budget, "kind": kind, **measure(args, budget, memory=kind == "memory")}
    if budget is not None and args.rankdyna_attention_groups != "auto":
        record["attention_groups"] = args.rankdyna_attention_groups
    record.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                  torch=torch.__version__, load_average_after=os.getloadavg(),
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    path = os.path.join(args.results_dir, run_name(model, budget, kind) + ".json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)


# -- the report -----------------------------------------------------------------------------------------------------
def load_runs(results_dir: str) -> dict[str, dict]:
    runs = {}
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                runs[name[:-5]] = json.load(f)
    return runs


def dense_wall_seconds(runs: dict[str, dict], model: str) -> float | None:
    """The dense run's wall time: the mean of the run before the RankDyna runs and the one after them (``repeat``),
    when both exist, so that a machine that speeds up or slows down during the benchmark does not tilt the ratios."""
    walls = [runs[name]["wall_seconds"] for name in (run_name(model, None), run_name(model, None, "repeat"))
             if name in runs]
    return sum(walls) / len(walls) if walls else None


def ratios(runs: dict[str, dict]) -> dict:
    """``docs/cost.json``: RankDyna over dense, whole timed run (MiniLM: ``run_ratio``, SmolLM2: ``lm_run_ratio``, per
    budget; dense: :func:`dense_wall_seconds`) and peak memory of the memory runs (per model, the largest over the
    budgets)."""
    out = {"run_ratio": {}, "lm_run_ratio": {}, "peak_memory_ratio": {}}
    for model, key in (("minilm", "run_ratio"), ("smollm2", "lm_run_ratio")):
        for kind in ("time", "memory"):
            dense = runs.get(run_name(model, None, kind))
            ours = [r for r in runs.values() if r["model"] == model and r["budget"] is not None
                    and r.get("kind", "time") == kind]
            if dense is None or not ours:
                continue
            if kind == "time":
                for run in sorted(ours, key=lambda r: r["budget"], reverse=True):
                    out[key][f"{run['budget']:g}"] = round(run["wall_seconds"] / dense_wall_seconds(runs, model), 3)
            else:
                out["peak_memory_ratio"][model] = round(max(r["peak_bytes"] for r in ours) / dense["peak_bytes"], 3)
    return out


def report(args) -> None:
    runs = load_runs(args.results_dir)
    if not runs:
        print(f"No run files in {args.results_dir}.")
        return
    summary = ratios(runs)
    summary["targets"] = TARGETS
    summary["command"] = "python scripts/bench_cost.py" + (
        f" --rankdyna_attention_groups {args.rankdyna_attention_groups}"
        if args.rankdyna_attention_groups != "auto" else "")
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
    rows = ["| model | run | whole run (s) | of dense | training (s) | step start / middle / end (s) | peak memory "
            "(MiB) | of dense | dev accuracy or train loss | peak RSS of the timed run (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model in ("minilm", "smollm2"):
        dense_wall, dense_memory = dense_wall_seconds(runs, model), runs.get(run_name(model, None, "memory"))
        budgets = sorted({r["budget"] for r in runs.values() if r["model"] == model and r["budget"]}, reverse=True)
        for budget, kind in [(None, "time")] + [(b, "time") for b in budgets] + [(None, "repeat")]:
            run, memory = runs.get(run_name(model, budget, kind)), runs.get(run_name(model, budget, "memory"))
            if run is None:
                continue
            if kind == "repeat":
                memory = None
            steps = run["step_seconds"]
            quality = (f"{100 * run['metric']:.1f}" if run.get("metric") is not None
                       else f"loss {run['train_loss']:.3f}")
            wall_ratio = f"{run['wall_seconds'] / dense_wall:.2f}" if dense_wall else ""
            peak = f"{memory['peak_bytes'] / 2**20:.0f}" if memory else ""
            memory_ratio = f"{memory['peak_bytes'] / dense_memory['peak_bytes']:.2f}" if memory and dense_memory else ""
            name = RUN_LABELS[kind] if budget is None else f"RankDyna {budget:g}"
            rows.append(f"| {model} | {name} | {run['wall_seconds']:.0f} | {wall_ratio} | {run['train_seconds']:.0f} "
                        f"| {steps['start']:.3f} / {steps['middle']:.3f} / {steps['end']:.3f} "
                        f"| {peak} | {memory_ratio} | {quality} | {run['peak_bytes'] / 2**20:.0f} |")
    parts = step_part_rows(runs)
    page = "<!-- bench_cost:begin -->\n<!-- bench_cost:end -->\n"  # a new --out page holds the table only
    if os.path.exists(args.out):
        with open(args.out) as f:
            page = f.read()
    page = between_markers(between_markers(page, "bench_cost", rows), "bench_cost_parts", parts)
    with open(args.out, "w") as f:
        f.write(page)
    print("\n".join(rows + [""] + parts))
    print(json.dumps({k: v for k, v in summary.items() if k != "targets"}, indent=1))


def step_part_rows(runs: dict[str, dict]) -> list[str]:
    """Where a step's time goes (timed runs that recorded it): medians at the start / middle / end of the run, ms."""
    rows = ["| model | run | forward, backward, clipping | RankDyna's hook | optimizer | scheduler, zero_grad |",
            "|---|---|---|---|---|---|"]
    for run in sorted(runs.values(), key=lambda r: (r["model"], r.get("kind") == "repeat", -(r["budget"] or 1.0))):
        kind = run.get("kind", "time")
        if kind == "memory" or "step_part_seconds" not in run:
            continue
        parts, hook = run["step_part_seconds"], run.get("rankdyna_hook_seconds")
        # RankDyna's hook runs inside the forward_backward part (it is the first callback); shown apart.
        forward = {phase: parts["forward_backward"][phase] - (hook[phase] if hook else 0.0) for phase in PHASES}
        cells = [forward, hook, parts["optimizer"], parts["after"]]
        name = RUN_LABELS[kind] if run["budget"] is None else f"RankDyna {run['budget']:g}"
        rows.append(f"| {run['model']} | {name} | " + " | ".join(
            " / ".join(f"{1000 * cell[phase]:.0f}" for phase in PHASES) if cell else "" for cell in cells) + " |")
    return rows if len(rows) > 2 else []


PHASES = ("start", "middle", "end")
RUN_LABELS = {"time": "dense", "repeat": "dense, again after"}


def between_markers(page: str, name: str, rows: list[str]) -> str:
    """``page`` with the lines between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``rows`` (as it
    was when either marker is missing or there are no rows)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not rows or begin not in page or end not in page:
        return page
    return page[:page.index(begin) + len(begin)] + "\n" + "\n".join(rows) + "\n" + page[page.index(end):]


def measure_cell(args, argv, model: str, budget: float | None, kind: str) -> None:
    path = os.path.join(args.results_dir, run_name(model, budget, kind) + ".json")
    if os.path.exists(path) and not args.force:
        print(f"skip {path} (exists; --force reruns)")
        return
    cell = f"{model}:{'dense' if budget is None else budget}:{kind}"
    print(f"run {cell}", flush=True)
    command = [sys.executable, os.path.abspath(__file__), "--child", cell,
               *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--force"]]
    env = dict(os.environ)
    if kind == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    subprocess.run(command, check=True, env=env)
    report(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    if not args.report_only:
        os.makedirs(args.results_dir, exist_ok=True)
        for model in args.models:
            for budget in [None] + args.budgets:
                for kind in ("time", "memory"):
                    measure_cell(args, argv, model, budget, kind)
            measure_cell(args, argv, model, None, "repeat")  # the dense run again: drift of the machine
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
