"""Peak training memory of dense fine-tuning against RankDyna on SmolLM2-135M, side by side.

Each setting runs in its own process (a fresh peak): load the model, prepare it (RankDyna: factorize, with
the whitened start calibrated on a few blocks), then train ``--steps`` optimizer steps with the real
``Trainer`` (AdamW, fp32) on random token blocks. Freed heap is returned to the OS (``malloc_trim``) and the
peak resident set size (RSS) is reset just before training (``/proc/self/clear_refs``), so the figure is the
training peak, not the loading peak; on a GPU the
figure is ``torch.cuda.max_memory_allocated`` over the training steps. Next to the measurement, the
training state is counted exactly from the prepared model: trainable parameters x 4 (weight, gradient, two
Adam moments) plus buffers (RankDyna's importance statistics).

    python scripts/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SETTINGS = {
    "dense": ("dense fine-tuning", None),
    "rankdyna": ("RankDyna, singular FFN groups, else defaults (factor_budget=1.0: break-even groups train, the rest "
                 "frozen; whitened)",
                 {"init": "whitened", "ffn_groups": "singular"}),
    "rankdyna_truncated": ("RankDyna, start truncated at break-even (untrained_groups='dropped'), whitened",
                           {"init": "whitened", "factor_budget": 1.0, "untrained_groups": "dropped",
                            "ffn_groups": "singular"}),
    "rankdyna_ffn_channels": ("RankDyna, FFN channels as groups (ffn_groups='channels'; the LM benchmark's recipe "
                              "above 0.5), attention as the defaults, whitened",
                              {"init": "whitened", "ffn_groups": "channels"}),
    "rankdyna_ffn_channels_truncated": ("RankDyna, FFN channels as groups, attention truncated at break-even (the "
                                        "LM benchmark's recipe at 0.5), whitened",
                                        {"init": "whitened", "ffn_groups": "channels", "factor_budget": 1.0,
                                         "untrained_groups": "dropped"}),
    "rankdyna_full_rank": ("RankDyna, every group's factors trained (factor_budget=None), whitened",
                           {"init": "whitened", "factor_budget": None, "ffn_groups": "singular"}),
    "rankdyna_v0_full_rank": ("RankDyna, every group's factors trained, with the element-wise 'sensitivity' "
                              "statistics", {"init": "whitened", "factor_budget": None, "importance": "sensitivity"}),
}
# What every RankDyna row was measured with beyond its own values: the library defaults before issue 28 (since then
# a decoder's 'auto' defaults differ: docs/method.md#defaults), pinned so a row's name keeps saying what ran.
MEASURED_DEFAULTS = {"factor_scaling": "group", "rank_by": "score_per_param", "untrained_groups": "frozen"}
# Variants whose training state the arithmetic section counts from shapes alone.
ESTIMATED = ("rankdyna", "rankdyna_truncated", "rankdyna_ffn_channels", "rankdyna_ffn_channels_truncated",
             "rankdyna_full_rank", "rankdyna_v0_full_rank")

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--calib-sequences", type=int, default=8)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "memory_lm.json"))
parser.add_argument("--out", default=os.path.join(REPO, "docs", "MEMORY_LM.md"))
parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one setting in this process
args = parser.parse_args()


def measure(setting: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
    from rankdyna_trainer.host_memory import release_free_heap, reset_peak_resident, resident_bytes
    from rankdyna_trainer.packaged_models import smollm2_path

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.steps * args.batch_size, args.seq_len), generator=g)
    callbacks = []
    overrides = SETTINGS[setting][1]
    if overrides is not None:
        config = RankDynaConfig(target_budget=0.5, warmup_fraction=0.25, final_fraction=0.25,
                                reallocation_interval=1, **{**MEASURED_DEFAULTS, **overrides})
        calib = torch.randint(0, vocab, (args.calib_sequences, args.seq_len), generator=g).to(device)
        prepare_model(model, config, [{"input_ids": calib[i : i + 4]} for i in range(0, len(calib), 4)])
        callbacks = [RankDynaCallback(config)]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    state_bytes = 4 * (4 * trainable + frozen + buffers)  # fp32: weight, grad, Adam m and v; buffers once
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    prepare_peak = resident_bytes("VmHWM")
    release_free_heap()
    before = resident_bytes("VmRSS")
    peak_reset = reset_peak_resident()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=5e-5,
            save_strategy="no", report_to="none", use_cpu=device == "cpu", disable_tqdm=True, logging_steps=1)
        Trainer(model=model, args=training_args, train_dataset=train, callbacks=callbacks).train()
    record = {
        "setting": setting, "device": device, "trainable_params": trainable, "frozen_params": frozen,
        "buffer_elements": buffers, "training_state_bytes": state_bytes, "peak_rss_loading_preparing": prepare_peak,
        "rss_before_training": before,
        "peak_rss_training": resident_bytes("VmHWM"), "peak_rss_reset": peak_reset,
        "seconds_per_step": (time.perf_counter() - start) / args.steps,
    }
    if device == "cuda":
        record["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return record


def state_bytes_estimate(model, variant: dict) -> tuple[int, int]:
    """(dense fine-tuning, RankDyna) training-state bytes in fp32 with AdamW, counted from the shapes only.

    Dense: every parameter x 16 bytes (weight, gradient, Adam m and v). RankDyna (``variant``: RankDynaConfig
    values): each targeted matrix holds r groups, k of them with trainable factors (r, k as prepare_model picks
    them). Trainable factor elements k*(m+n) cost 16 bytes (+ 8 for the 'sensitivity' importance's element
    statistics), frozen ones (r-k)*(m+n) cost 4; per group 28 bytes (s with gradient and Adam moments, gate,
    gate gradient, Fisher score; + 8 with 'sensitivity'). With ``ffn_groups='channels'`` the FFN matrices stay
    dense (16 bytes per weight) and each intermediate channel adds 12 bytes (gate, gate gradient, Fisher score).
    """
    from rankdyna_trainer import RankDynaConfig
    from rankdyna_trainer.methods.rankdyna.model import initial_rank, trainable_rank
    from rankdyna_trainer.targets import ffn_channel_layers, find_target_linears, linear_shape

    config = RankDynaConfig(target_budget=0.5, **{**MEASURED_DEFAULTS, **{k: v for k, v in variant.items()
                                                                          if k != "init"}})
    element_stats = 8 if config.importance == "sensitivity" else 0
    linears = find_target_linears(model)
    channel_ffns = ffn_channel_layers(model, config.ffn_roles(model)) if config.ffn_groups == "channels" else {}
    whole = set(channel_ffns) | {p for producers in channel_ffns.values() for p in producers}
    targets = [linear_shape(l) for name, l in linears.items() if name not in whole]
    total = sum(p.numel() for p in model.parameters())
    rankdyna = 16 * (total - sum(m * n for m, n in targets))
    rankdyna += 12 * sum(linear_shape(linears[name])[1] for name in channel_ffns)
    for m, n in targets:
        k = trainable_rank(config, m, n)
        r = k if config.untrained_groups == "dropped" else initial_rank(config, m, n)
        rankdyna += (16 + element_stats) * k * (m + n) + 4 * (r - k) * (m + n) + (28 + element_stats) * r
    return 16 * total, rankdyna


def arithmetic_rows(name: str, model) -> list[str]:
    rows = []
    for setting in ESTIMATED:
        dense, rankdyna = state_bytes_estimate(model, SETTINGS[setting][1])
        rows.append(f"| {name} | {SETTINGS[setting][0]} | {dense / 1e9:.2f} | {rankdyna / 1e9:.2f} | "
                    f"{rankdyna / dense:.2f} |")
    return rows


def llama_7b_arithmetic() -> list[str]:
    """Training-state estimate for LLaMA-7B (shapes of meta-llama/Llama-2-7b, built on the meta device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))
    return arithmetic_rows("LLaMA-7B", model)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def write_report(records: list[dict]) -> None:
    dense = next((r for r in records if r["setting"] == "dense"), None)
    command = "python scripts/bench_memory.py " + " ".join(sys.argv[1:])
    peak_key = "cuda_max_allocated" if records[0]["device"] == "cuda" else "peak_rss_training"
    peak_name = "CUDA max allocated" if peak_key == "cuda_max_allocated" else "peak RSS while training"
    lines = [
        "# Training memory: dense fine-tuning vs RankDyna (SmolLM2-135M)",
        "",
        "Generated by `scripts/bench_memory.py`; do not edit by hand.",
        "",
        f"- Command: `{command}` (run under `flock /work/notes/heavy.lock`), Python {platform.python_version()}, "
        f"device: {records[0]['device']}.",
        f"- Each setting in a fresh process: {args.steps} AdamW steps (fp32) of {args.batch_size} x {args.seq_len} "
        "random tokens through the real `Trainer`; RankDyna at target budget 0.5 with the whitened start "
        f"(calibrated on {args.calib_sequences} blocks before training). After loading and preparing the model, "
        "freed heap is handed back to the OS (`malloc_trim`) and the peak is reset, so the peak is the "
        "training peak (weights, gradients, optimizer and importance state, activations, temporaries); the "
        "loading + preparing peak is shown apart.",
        "- Training state: trainable parameters x 4 (weight, gradient, Adam m and v) + frozen parameters + "
        "buffers (RankDyna's gate and importance statistics), fp32, counted from the prepared model.",
        "",
        f"| setting | trainable params | buffers | training state (GiB) | RSS before training (GiB) | {peak_name} "
        "(GiB) | x dense | peak while loading + preparing (GiB) | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = f"{r[peak_key] / dense[peak_key]:.2f}" if dense else "-"
        lines.append(f"| {SETTINGS[r['setting']][0]} | {r['trainable_params']:,} | {r['buffer_elements']:,} | "
                     f"{gib(r['training_state_bytes'])} | {gib(r['rss_before_training'])} | {gib(r[peak_key])} | "
                     f"**{ratio}** | {gib(r['peak_rss_loading_preparing'])} | {r['seconds_per_step']:.1f} |")
    lines += [
        "",
        "## Arithmetic for larger models",
        "",
        "Training state only (fp32 weights, gradients, AdamW moments, RankDyna's importance buffers), counted "
        "from the shapes by `state_bytes_estimate` in this script; activations come on top and are about the "
        "same for both, so the ratio of totals is lower still. Bytes: see `state_bytes_estimate` (trainable "
        "factor element 16, frozen factor element 4, per group 28; the 'sensitivity' importance adds 8 per "
        "trainable element and per group).",
        "",
        "| model | setting | dense fine-tuning (GB) | RankDyna (GB) | x dense |",
        "|---|---|---|---|---|",
    ]
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rankdyna_trainer.packaged_models import smollm2_path

    with torch.device("meta"):
        smol = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_path()))
    lines += arithmetic_rows("SmolLM2-135M", smol)
    lines += llama_7b_arithmetic()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.json, "w") as f:
        json.dump({"command": command, "records": records}, f, indent=2)


if __name__ == "__main__":
    if args.child:
        print("RECORD " + json.dumps(measure(args.child)), flush=True)
        sys.exit(0)
    records = []
    for setting in args.settings:
        child = [sys.executable, os.path.abspath(__file__), "--child", setting, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                 "--calib-sequences", str(args.calib_sequences), "--threads", str(args.threads)]
        done = subprocess.run(child, capture_output=True, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RECORD ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"Measuring {setting} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        records.append(json.loads(lines[-1].removeprefix("RECORD ")))
        print(f"{setting}: peak {gib(records[-1]['peak_rss_training'])} GiB", flush=True)
    write_report(records)
