"""Held-out perplexity of SmolLM2-135M compressed by RankDyna and the post-training baselines, same budget.

Every method keeps the same fraction (``--budgets``) of the dense weight parameters of the targeted matrices
(q/k/v/o/gate/up/down of all 30 blocks). Text is GLUE sentences (offline): training sentences give the
calibration set (the same blocks for every calibrated method, RankDyna's whitened start included) and the
short causal-LM fine-tune, dev sentences the held-out set. ``*_ft`` methods and RankDyna get the same
fine-tune (steps, batches, learning rate). Every compressed model is exported, saved, reloaded with
``load_compressed_model`` and evaluated from the reloaded copy.

Each (method, budget, seed) run writes one JSON under ``--runs-dir`` and is skipped when that file exists, so
the benchmark resumes where it stopped. The seed picks the calibration and fine-tune blocks and the fine-tune's
data order; the held-out blocks are the same for every run. ``--results-json`` (mean over seeds under
``method@budget`` keys) and the Markdown table are rebuilt from all run files after each run.

    OMP_NUM_THREADS=2 python scripts/benchmark_lm.py --methods dense svdllm rankdyna --seeds 0 1 2
    python scripts/benchmark_lm.py --report-only
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import rankdyna_trainer  # noqa: E402
from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model  # noqa: E402
from rankdyna_trainer.experiment import lm_targets  # noqa: E402
from rankdyna_trainer.experiment.glue_data import load_glue  # noqa: E402
from rankdyna_trainer.export import exported_params  # noqa: E402
from rankdyna_trainer.methods.lorap import LoRAPConfig, LowRankSVDConfig, compress_lorap, compress_svd  # noqa: E402
from rankdyna_trainer.methods.mpo import MPOConfig, export_mpo, prepare_mpo  # noqa: E402
from rankdyna_trainer.methods.svdllm import SVDLLMConfig, compress_svdllm  # noqa: E402
from rankdyna_trainer.packaged_models import smollm2_path  # noqa: E402
from rankdyna_trainer.quantizer import load_compressed_model, save_compressed_model  # noqa: E402
from rankdyna_trainer.targets import find_target_linears  # noqa: E402

# The `rankdyna` row is the library default, `RankDynaConfig(target_budget=b)` and the calibration blocks, nothing
# else: on a causal LM its 'auto' fields resolve to the decoder recipe chosen from the ablation rows below
# (docs/DECODER.md; rankdyna_trainer.methods.rankdyna.defaults), and the run file records the resolved config.
#
# The ablation rows pin the settings they were measured with, so a row's name says exactly what ran whatever the
# defaults become: the library defaults before issue 28 (GLUE's: one setting for every model kind) ...
DEFAULTS_BEFORE_28 = {"factor_scaling": "group", "rank_by": "score_per_param", "untrained_groups": "frozen"}
# ... and the shared settings of every ablation row (whitened start, schedule fitted to a 30-step fine-tune, singular
# groups in every matrix as when the rows were measured); each row adds its own config values on top.
RANKDYNA_RECIPE = {"init": "whitened", "warmup_fraction": 0.1, "final_fraction": 0.2, "reallocation_interval": 2,
                   "ffn_groups": "singular"}
# The decoder recipe, chosen from the seed-0 ablation rows below (docs/DECODER.md): plain factor steps (on a
# 30-step fine-tune at lr 5e-5 the per-group step scaling of issue 9 makes steps too small), groups ranked by
# their raw Fisher score, and the start picked by how far the budget goes (`decoder_start`). With FFN channels as
# groups (issue 11: 206.6 vs 256.2 at 50 %, 86.4 vs 92.9 at 80 %, seed 0, lr 5e-5) it is the library's decoder
# default since issue 28.
SINGULAR_DECODER_RECIPE = {"factor_scaling": "none", "rank_by": "score"}
DECODER_START_METHODS = ("rankdyna_singular_ffn",)


def decoder_start(budget: float) -> dict:
    """Frozen exact start above half the weights; at 0.5 and below, start truncated at break-even (the library's
    decoder default, ``defaults.kind_defaults``).

    Measured at seed 0: the exact start wins at 0.8 (92.9 vs 119.4 truncated), the truncated one at 0.5
    (250 vs 297): with half the weights gone, every kept group needs trainable factors."""
    return {"untrained_groups": "frozen" if budget > 0.5 else "dropped"}


# The method as first shipped (before issue 9's fixes): AdaLoRA sensitivity, plain factorized steps, raw scores.
V0 = {"importance": "sensitivity", "factor_scaling": "none", "rank_by": "score", "min_rank": 0}
TRUNCATED = {"untrained_groups": "dropped"}  # groups beyond factor_budget dropped at factorization time
RANKDYNA_VARIANTS = {
    "rankdyna": None,  # RankDynaConfig(target_budget=budget): the library default
    "rankdyna_every_step_scoring": None,  # the default with masked_group_scoring='every_step' (before issue 25)
    "rankdyna_singular_ffn": SINGULAR_DECODER_RECIPE,  # + decoder_start(budget): the recipe before issue 11
    "rankdyna_defaults": {},  # the library defaults before issue 28: group factor scaling, per-parameter ranking,
    # frozen start
    "rankdyna_full_rank": {"factor_budget": None},
    "rankdyna_truncated": {"factor_budget": 1.0, **TRUNCATED},
    "rankdyna_unscaled": {"factor_scaling": "none"},
    "rankdyna_unscaled_full_rank": {"factor_scaling": "none", "factor_budget": None},
    "rankdyna_sensitivity": {"importance": "sensitivity"},
    "rankdyna_unscaled_truncated": {"factor_scaling": "none", "factor_budget": 1.0, **TRUNCATED},
    "rankdyna_unscaled_by_score": {"factor_scaling": "none", "rank_by": "score"},
    "rankdyna_unscaled_by_score_truncated": {"factor_scaling": "none", "rank_by": "score", "factor_budget": 1.0,
                                             **TRUNCATED},
    "rankdyna_scaled_by_score_truncated": {"rank_by": "score", "factor_budget": 1.0, **TRUNCATED},
    "rankdyna_prune_first_half": {**SINGULAR_DECODER_RECIPE, "factor_budget": 1.0, **TRUNCATED, "warmup_fraction": 0.05,
                                  "final_fraction": 0.5},
    "rankdyna_v0_frozen": {**V0, "factor_budget": 1.0},
    "rankdyna_v0_truncated_0.9": {**V0, "factor_budget": 0.9, **TRUNCATED},
    "rankdyna_v0_full_rank": {**V0, "factor_budget": None},
    "rankdyna_v0_break_even": {**V0, "factor_budget": 1.0, **TRUNCATED},
    "rankdyna_v0_break_even_svd_init": {**V0, "factor_budget": 1.0, **TRUNCATED, "init": "svd"},
    "rankdyna_v0_break_even_final_half": {**V0, "factor_budget": 1.0, **TRUNCATED, "final_fraction": 0.5},
}
# name -> (label, whether the seed changes the result, whether the method fine-tunes)
METHODS = {
    "dense": ("dense (no compression)", False, False),
    "dense_ft": ("dense + same fine-tune (control)", True, True),
    "svd": ("SVD (uniform rank)", False, False),
    "asvd": ("activation-weighted SVD (uniform rank)", True, False),
    "svdllm": ("whitened SVD, SVD-LLM (uniform rank)", True, False),
    "svdllm_global": ("whitened SVD, SVD-LLM (global allocation)", True, False),
    "svdllm_damping_1e-4": ("ablation: whitened SVD (uniform), ridge 1e-4 instead of 1e-2", True, False),
    "svdllm_damping_1e-6": ("ablation: whitened SVD (uniform), ridge 1e-6 instead of 1e-2", True, False),
    "lorap": ("LoRAP", True, False),
    "mpo": ("MPO (3 tensors, bond-truncated)", False, False),
    "svdllm_ft": ("whitened SVD (uniform) + same fine-tune", True, True),
    "svdllm_global_ft": ("whitened SVD (global) + same fine-tune", True, True),
    "lorap_ft": ("LoRAP + same fine-tune", True, True),
    "mpo_ft": ("MPO + same fine-tune (auxiliary tensors)", True, True),
    "rankdyna": ("RankDyna, library defaults (RankDynaConfig(target_budget=b): on a decoder the whitened start, plain "
                 "factor steps, raw Fisher score, FFN channels as groups; attention's exact start above 0.5, truncated "
                 "at break-even at 0.5 and below)", True, True),
    "rankdyna_every_step_scoring": ("ablation: RankDyna library defaults, masked groups scored on every pruning step "
                                    "(masked_group_scoring='every_step', the scoring before issue 25)", True, True),
    "rankdyna_singular_ffn": ("ablation: RankDyna decoder recipe with the FFNs as singular groups (the recipe before "
                              "issue 11)", True, True),
    "rankdyna_defaults": ("ablation: RankDyna library defaults before issue 28, GLUE's (group factor scaling, score "
                          "per parameter, exact start)", True, True),
    "rankdyna_full_rank": ("RankDyna, every group's factors trained (factor_budget None, ~2x memory)", True, True),
    "rankdyna_truncated": ("ablation: RankDyna, start truncated at break-even (groups beyond dropped)", True, True),
    "rankdyna_unscaled": ("ablation: RankDyna defaults, plain factor steps (factor_scaling none)", True, True),
    "rankdyna_unscaled_full_rank": ("ablation: RankDyna, plain factor steps, every group's factors trained",
                                    True, True),
    "rankdyna_unscaled_truncated": ("ablation: RankDyna, plain factor steps, start truncated at break-even",
                                    True, True),
    "rankdyna_unscaled_by_score": ("ablation: RankDyna, plain factor steps, groups ranked by raw score", True, True),
    "rankdyna_unscaled_by_score_truncated": ("ablation: RankDyna, plain factor steps, raw score, truncated start",
                                             True, True),
    "rankdyna_scaled_by_score_truncated": ("ablation: RankDyna, group factor scaling, raw score, truncated start",
                                           True, True),
    "rankdyna_prune_first_half": ("ablation: RankDyna decoder recipe, truncated start, pruned by mid-run (warmup "
                                  "0.05, last half at the target)", True, True),
    "rankdyna_sensitivity": ("ablation: RankDyna defaults, AdaLoRA sensitivity score instead of Fisher", True, True),
    "rankdyna_v0_frozen": ("ablation, pre-issue-9 method with the frozen-factor default start", True, True),
    "rankdyna_v0_truncated_0.9": ("ablation, pre-issue-9 method: start truncated at factor_budget 0.9", True, True),
    "rankdyna_v0_full_rank": ("ablation, pre-issue-9 method: every group's factors trained", True, True),
    "rankdyna_v0_break_even": ("ablation, pre-issue-9 method: start truncated at break-even", True, True),
    "rankdyna_v0_break_even_svd_init": ("ablation, pre-issue-9 method: plain SVD start truncated at break-even",
                                        True, True),
    "rankdyna_v0_break_even_final_half": ("ablation, pre-issue-9 method: truncated at break-even, last half of the "
                                          "steps at the target", True, True),
}
SETTINGS = ("seq_len", "calib_sequences", "eval_sequences", "train_steps", "batch_size", "lr")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--methods", nargs="+", default=["dense", "svdllm", "lorap", "rankdyna"], choices=list(METHODS))
parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="methods whose result does not depend on the seed run with the first one only")
parser.add_argument("--glue-dir", default=os.path.join(REPO, "..", "shared", "data", "glue"))
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--calib-sequences", type=int, default=32)
parser.add_argument("--eval-sequences", type=int, default=32)
parser.add_argument("--train-steps", type=int, default=30)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--runs-dir", default=os.path.join(REPO, "benchmarks", "lm"))
parser.add_argument("--results-json", default=os.path.join(REPO, "docs", "results_lm.json"))
parser.add_argument("--out", default=os.path.join(REPO, "docs", "RESULTS_LM.md"))
parser.add_argument("--report-only", action="store_true", help="rebuild --results-json and --out from the run files")
parser.add_argument("--recipe-runs-dir", default=os.path.join(REPO, "benchmarks", "lm_recipe_before_28"),
                    help="run files of the decoder recipe row that issue 28's target compares the default row with")
args = parser.parse_args()
torch.set_num_threads(args.threads)
COMMAND = "python scripts/benchmark_lm.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
SETTING_VALUES = {k: getattr(args, k) for k in SETTINGS}

model_dir = smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
TASKS = {"sst2": ["sentence"], "cola": ["sentence"], "mrpc": ["sentence1", "sentence2"],
         "rte": ["sentence1", "sentence2"]}
EVAL_SEED = 0  # the held-out blocks never change with --seeds


# -- text: GLUE sentences, packed into fixed-length blocks ---------------------------------------------
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


class RunData:
    """Calibration and fine-tune blocks of one seed (disjoint), plus the fixed held-out blocks."""

    _train_sentences: list[str] | None = None
    eval_ids: torch.Tensor | None = None

    def __init__(self, seed: int):
        if RunData._train_sentences is None:
            RunData._train_sentences = sentences("train")
            RunData.eval_ids = blocks(sentences("validation"), args.eval_sequences, EVAL_SEED)
        train = blocks(RunData._train_sentences, args.calib_sequences + args.train_steps * args.batch_size, seed)
        self.seed = seed
        self.calib_ids, self.finetune_ids = train[: args.calib_sequences], train[args.calib_sequences :]
        self.calibration = [{"input_ids": self.calib_ids[i : i + 4]} for i in range(0, len(self.calib_ids), 4)]


@torch.no_grad()
def perplexity(model) -> float:
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(RunData.eval_ids), 4):
        batch = RunData.eval_ids[i : i + 4]
        loss = model(input_ids=batch, labels=batch).loss  # mean over the batch's shifted tokens
        n = batch.numel() - batch.shape[0]
        nll, tokens = nll + loss.item() * n, tokens + n
    return math.exp(nll / tokens)


def fresh_model():
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


# -- methods ----------------------------------------------------------------------------------------------
def finetune(model, data: RunData, callbacks=()) -> float:
    """The causal-LM fine-tune every fine-tuning method gets (same blocks, steps, lr); returns the last loss."""
    train = Dataset.from_dict({"input_ids": data.finetune_ids.tolist(), "labels": data.finetune_ids.tolist()})
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.train_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
            save_strategy="no", report_to="none", use_cpu=True, seed=data.seed, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train, callbacks=list(callbacks))
        trainer.train()
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else float("nan")


# Rows on top of the library defaults (RANKDYNA_VARIANTS None): the masked groups scored on every pruning step, as
# every run before issue 25's kept-groups path did (the `rankdyna` rows measured before issue 28 among them).
ON_DEFAULTS = {"rankdyna": {}, "rankdyna_every_step_scoring": {"masked_group_scoring": "every_step"}}


def rankdyna_config(method: str, budget: float) -> RankDynaConfig:
    if RANKDYNA_VARIANTS[method] is None:
        return RankDynaConfig(target_budget=budget, **ON_DEFAULTS[method])
    start = decoder_start(budget) if method in DECODER_START_METHODS else {}
    return RankDynaConfig(target_budget=budget, **{**DEFAULTS_BEFORE_28, **RANKDYNA_RECIPE, **RANKDYNA_VARIANTS[method],
                                                   **start})


def compress(method: str, model, budget: float, data: RunData):
    """Compress (and fine-tune) ``model`` in place; returns (module layout, method config, extra record fields)."""
    base = method.removesuffix("_ft")
    extra = {}
    if method in RANKDYNA_VARIANTS:
        callback = RankDynaCallback(rankdyna_config(method, budget))
        prepare_model(model, callback.config, data.calibration)
        extra["final_train_loss"] = finetune(model, data, [callback])
        # The config the run trained with: every 'auto' field resolved (for this model kind and run length).
        return export_model(model), callback.config.to_dict(), extra
    if base == "dense":
        modules, config = {}, {}
    elif base == "svd":
        config = LowRankSVDConfig(target_budget=budget)
        modules = compress_svd(model, config)
    elif base == "asvd":
        config = LowRankSVDConfig(target_budget=budget, activation_weighted=True)
        modules = compress_svd(model, config, data.calibration)
    elif base.startswith("svdllm"):
        config = SVDLLMConfig(target_budget=budget, allocation="global" if base == "svdllm_global" else "uniform",
                              damping=float(base.rsplit("_", 1)[1]) if "_damping_" in base else 1e-2)
        modules = compress_svdllm(model, config, data.calibration)
    elif base == "lorap":
        config = LoRAPConfig(target_budget=budget)
        modules = compress_lorap(model, config, data.calibration)
    elif base == "mpo":
        config = MPOConfig(target_budget=budget)
        prepare_mpo(model, config)
    else:
        raise AssertionError(method)
    if method.endswith("_ft"):
        extra["final_train_loss"] = finetune(model, data)  # shapes do not change, so the layout stays valid
    if base == "mpo":
        modules = export_mpo(model)
    return modules, (vars(config) if not isinstance(config, dict) else config), extra


# -- accounting -------------------------------------------------------------------------------------------
dense = fresh_model()
TARGETS = {n: tuple(l.weight.shape) for n, l in find_target_linears(dense).items()}
DENSE_TARGET_PARAMS = sum(m * n for m, n in TARGETS.values())
DENSE_TOTAL_PARAMS = sum(p.numel() for p in dense.parameters())
del dense
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def kept_params(modules: dict) -> dict[str, int]:
    """Targeted weight parameters kept, in all and split into attention and FFN matrices."""
    kept = {n: exported_params(modules[n]) if n in modules else m * k for n, (m, k) in TARGETS.items()}
    attention = sum(v for n, v in kept.items() if n.rsplit(".", 1)[-1] in ATTENTION)
    return {"target_params": sum(kept.values()), "attention_params": attention,
            "ffn_params": sum(kept.values()) - attention}


def layout_rank(name: str, entry: dict) -> int | str:
    if "rank" in entry:
        return entry["rank"]
    shape = (entry.get("out_features"), entry.get("in_features"))
    return "dense" if shape == TARGETS.get(name) else f"dense {shape[0]}x{shape[1]}"


def dense_split() -> tuple[int, int]:
    attention = sum(m * k for n, (m, k) in TARGETS.items() if n.rsplit(".", 1)[-1] in ATTENTION)
    return attention, DENSE_TARGET_PARAMS - attention


# -- runs ---------------------------------------------------------------------------------------------------
def run_path(method: str, budget: float, seed: int) -> str:
    return os.path.join(args.runs_dir, f"{method}@{budget}_seed{seed}.json")


def planned_runs() -> list[tuple[str, float, int]]:
    """Cheap post-training methods first, fine-tuning ones last; seed-independent methods once."""
    order = sorted(args.methods, key=lambda m: METHODS[m][2])
    runs = []
    for seed_index, seed in enumerate(args.seeds):
        for method in order:
            if seed_index > 0 and not METHODS[method][1]:
                continue
            for budget in ([1.0] if method in ("dense", "dense_ft") else args.budgets):
                runs.append((method, budget, seed))
    return runs


def run_one(method: str, budget: float, seed: int) -> dict:
    data = RunData(seed)
    model = fresh_model()
    torch.manual_seed(seed)
    start = time.perf_counter()
    modules, method_config, extra = compress(method, model, budget, data)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as saved:
        save_compressed_model(model, saved, modules, method, method_config)
        del model
        reloaded = load_compressed_model(saved)
    record = {
        "method": method, "budget": budget, "seed": seed, "perplexity": perplexity(reloaded),
        **kept_params(modules), "total_params": sum(p.numel() for p in reloaded.parameters()),
        "seconds": seconds, **extra, "settings": SETTING_VALUES, "method_config": method_config,
        # kept rank per targeted matrix ("dense": stored as a full matrix; "dense OxI": a full matrix the method
        # made narrower, e.g. FFN channels pruned)
        "ranks": {n: layout_rank(n, e) for n, e in modules.items()},
        "command": COMMAND, "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "rankdyna_trainer": rankdyna_trainer.__version__, "python": platform.python_version()},
    }
    return json.loads(json.dumps(record, default=str))


# -- report -------------------------------------------------------------------------------------------------
def load_runs() -> tuple[list[dict], list[str]]:
    current, stale = [], []
    for path in sorted(glob.glob(os.path.join(args.runs_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if record.get("settings") == SETTING_VALUES:
            current.append(record)
        else:
            stale.append(os.path.basename(path))
    return current, stale


def aggregate(runs: list[dict]) -> dict:
    grouped: dict[str, list[dict]] = {}
    for r in runs:
        grouped.setdefault(f"{r['method']}@{r['budget']}", []).append(r)
    results = {}
    for key, rs in grouped.items():
        rs.sort(key=lambda r: r["seed"])
        ppl = [r["perplexity"] for r in rs]
        first = rs[0]
        results[key] = {
            "method": first["method"], "budget": first["budget"], "perplexity": statistics.fmean(ppl),
            "perplexity_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
            "perplexity_seeds": ppl, "seeds": [r["seed"] for r in rs],
            "target_params": first["target_params"], "attention_params": first["attention_params"],
            "ffn_params": first["ffn_params"], "total_params": first["total_params"],
            "seconds": statistics.fmean(r["seconds"] for r in rs),
        }
    return results


def fmt_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def write_report(runs: list[dict], stale: list[str]) -> None:
    results = aggregate(runs)
    commands = sorted({r["command"] for r in runs})
    dates = sorted(r["date"] for r in runs)
    meta = {"settings": SETTING_VALUES, "commands": commands, "dates": [dates[0], dates[-1]] if dates else [],
            "runs_dir": os.path.relpath(args.runs_dir, REPO),
            "rankdyna": "RankDynaConfig(target_budget=budget): the library defaults; each run file's method_config "
                        "holds them resolved",
            "rankdyna_on_defaults": ON_DEFAULTS,
            "rankdyna_ablation_shared": {**DEFAULTS_BEFORE_28, **RANKDYNA_RECIPE},
            "rankdyna_variants": {k: v for k, v in RANKDYNA_VARIANTS.items() if v is not None},
            "dense_target_params": DENSE_TARGET_PARAMS,
            "dense_total_params": DENSE_TOTAL_PARAMS}
    with open(args.results_json, "w") as f:
        json.dump({"_meta": meta, **dict(sorted(results.items()))}, f, indent=2)
    s = SETTING_VALUES
    att_dense, ffn_dense = dense_split()
    versions = runs[-1]["versions"] if runs else {}
    lines = [
        "# Decoder LM compression: SmolLM2-135M held-out perplexity",
        "",
        f"Generated by `scripts/benchmark_lm.py` from the run files in `{meta['runs_dir']}/` "
        "(one per method, budget and seed); do not edit by hand. Mean over seeds in docs/results_lm.json.",
        "",
        "- Commands (each adds the runs it is missing): " + "; ".join(f"`{c}`" for c in commands),
        f"- Runs dated {' to '.join(meta['dates'])}; torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, Python {versions.get('python')}; CPU, 2 threads, run under the shared "
        "lock (`flock /work/notes/heavy.lock ...`) so no other heavy job ran beside them.",
        f"- Model: SmolLM2-135M-Instruct (packaged Q4_1 GGUF, dequantized to float32). Targeted: {len(TARGETS)} "
        f"matrices (q/k/v/o/gate/up/down x 30 blocks), {DENSE_TARGET_PARAMS:,} dense weight params of "
        f"{DENSE_TOTAL_PARAMS:,} in the model ({att_dense:,} attention, {ffn_dense:,} FFN).",
        f"- Text: GLUE sentences (SST-2, CoLA, MRPC, RTE) joined by EOS into blocks of {s['seq_len']} tokens. "
        f"Calibration (LoRAP, activation-weighted SVD, SVD-LLM, RankDyna's whitened start): the same "
        f"{s['calib_sequences']} training blocks. Fine-tune (RankDyna and every `+ same fine-tune` row): "
        f"{s['train_steps']} steps x {s['batch_size']} training blocks (disjoint from calibration), AdamW lr "
        f"{s['lr']} linear decay. The seed draws the calibration and fine-tune blocks and the data order. "
        f"Held-out: {s['eval_sequences']} fixed blocks of dev sentences "
        f"({s['eval_sequences'] * (s['seq_len'] - 1):,} predicted tokens).",
        "- RankDyna rows: `rankdyna` is `RankDynaConfig(target_budget=b)`, the library defaults, which on this "
        "decoder resolve to the decoder recipe (docs/method.md#defaults; the run files' `method_config`). The ablation "
        f"rows share `{ {**DEFAULTS_BEFORE_28, **RANKDYNA_RECIPE} }` (the library defaults before issue 28 and the "
        "30-step schedule); `rankdyna_singular_ffn` adds "
        f"`{SINGULAR_DECODER_RECIPE}` and `untrained_groups` 'frozen' above budget 0.5, 'dropped' at 0.5 and below; "
        "the others add: "
        + ", ".join(f"`{k}` {v}" for k, v in RANKDYNA_VARIANTS.items() if v) + ".",
        "- Every compressed model was exported, saved, reloaded with `load_compressed_model` and evaluated after "
        "reload. Time: wall-clock seconds of compression (+ calibration, + fine-tune), mean over seeds.",
        "",
        "| budget (kept) | method | held-out PPL (mean) | per seed | targeted params | attention / FFN kept "
        "| time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = list(METHODS)
    for key, r in sorted(results.items(), key=lambda kv: (-kv[1]["budget"], order.index(kv[1]["method"]))):
        per_seed = ", ".join(fmt_ppl(p) for p in r["perplexity_seeds"]) if len(r["seeds"]) > 1 else "(one run)"
        lines.append(
            f"| {r['budget']:.0%} | {METHODS[r['method']][0]} | {fmt_ppl(r['perplexity'])} | {per_seed} | "
            f"{r['target_params']:,} ({r['target_params'] / DENSE_TARGET_PARAMS:.1%}) | "
            f"{r['attention_params'] / att_dense:.0%} / {r['ffn_params'] / ffn_dense:.0%} | {r['seconds']:.0f} |")
    missing = [f"{m}@{b} seed {sd}" for m, b, sd in planned_runs()
               if not os.path.isfile(run_path(m, b, sd))] if not args.report_only else []
    recipe_dir = os.path.relpath(args.recipe_runs_dir, REPO)
    lines += [""] + lm_targets.default_against_recipe(results, lm_targets.load_recipe_runs(args.recipe_runs_dir),
                                                      recipe_dir)
    if missing:
        lines += ["", f"Not run yet in the last command: {', '.join(missing)}."]
    if stale:
        lines += ["", f"Ignored (measured with other settings): {', '.join(stale)}."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    os.makedirs(args.runs_dir, exist_ok=True)
    if not args.report_only:
        for method, budget, seed in planned_runs():
            path = run_path(method, budget, seed)
            if os.path.isfile(path):
                print(f"{method}@{budget} seed {seed}: already measured, skipping", flush=True)
                continue
            record = run_one(method, budget, seed)
            with open(path + ".partial", "w") as f:
                json.dump(record, f, indent=2)
            os.replace(path + ".partial", path)
            print(f"{method}@{budget} seed {seed}: ppl {record['perplexity']:.2f}, params {record['target_params']:,}"
                  f", {record['seconds']:.0f}s", flush=True)
            write_report(*load_runs())
    write_report(*load_runs())


if __name__ == "__main__":
    main()
