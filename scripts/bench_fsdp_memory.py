"""Memory per process of RankDyna training on SmolLM2-135M, unsharded (1 process) and FSDP2-sharded (N processes).

Each N runs under ``torchrun --nproc_per_node N`` (gloo on the CPU); every process loads the model, runs
prepare_model (RankDyna's defaults before issue 28, pinned in CONFIG: FFN channels, attention singular groups with
factor_budget=1.0, 'fisher'), then,
for N > 1, ``shard_model(model, DistributedConfig(fsdp_size=N))``, and trains ``--steps`` AdamW steps (fp32) with
the real Trainer on the same global batch. As in scripts/bench_memory.py, freed heap is handed back to the OS and the
peak RSS is reset just before training, so the peak is the training peak. Next to it, each process's training state
is counted exactly from the tensors it holds: its shard of every trainable parameter x 4 (weight, gradient, Adam m
and v), of every frozen parameter, and of every buffer. Also writes the same count for LLaMA-7B on 8 devices, from
the shapes.

    python scripts/bench_fsdp_memory.py            # writes docs/MEMORY_FSDP.md and benchmarks/memory_fsdp.json
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

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--global-batch", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "memory_fsdp.json"))
parser.add_argument("--out", default=os.path.join(REPO, "docs", "MEMORY_FSDP.md"))
parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: one torchrun process
args = parser.parse_args()

# The library defaults before issue 28 pinned (a decoder's 'auto' defaults differ since: docs/method.md#defaults), so
# the measured configuration stays the one the page describes.
CONFIG = dict(target_budget=0.5, warmup_fraction=0.25, final_fraction=0.25, reallocation_interval=1, init="svd",
              factor_scaling="group", rank_by="score_per_param", untrained_groups="frozen")


def local_state_bytes(model) -> int:
    """fp32 training state this process holds: its shard of each trainable parameter x 4 (weight, gradient,
    Adam m and v), of each frozen parameter, and of each buffer."""
    from rankdyna_trainer.methods.rankdyna.dtensors import local

    trainable = sum(local(p).numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(local(p).numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(local(b).numel() for b in model.buffers())
    return 4 * (4 * trainable + frozen + buffers)


def measure() -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.distributed import DistributedConfig

    from rankdyna_trainer.host_memory import release_free_heap, reset_peak_resident, resident_bytes
    from rankdyna_trainer.methods.rankdyna import RankDynaCallback, RankDynaConfig, prepare_model, shard_model
    from rankdyna_trainer.packaged_models import smollm2_path

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.set_num_threads(max(1, 2 // world))
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    # SmolLM2 ties its output layer to the embeddings. These figures were measured untied (a separate copy, in every
    # run, N = 1 included, so the runs compare like with like), from when shard_model refused tied embeddings.
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    config = RankDynaConfig(**CONFIG)
    prepare_model(model, config)
    if world > 1:
        shard_model(model, DistributedConfig(fsdp_size=world))
    state = local_state_bytes(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.steps * args.global_batch, args.seq_len), generator=g)
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    prepare_peak = resident_bytes("VmHWM")
    release_free_heap()
    before = resident_bytes("VmRSS")
    peak_reset = reset_peak_resident()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.global_batch // world,
            learning_rate=5e-5, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
            logging_steps=1, ddp_backend="gloo" if world > 1 else None)
        Trainer(model=model, args=training_args, train_dataset=train, callbacks=[RankDynaCallback(config)]).train()
    return {"processes": world, "rank": rank, "training_state_bytes": state, "peak_rss_loading_preparing": prepare_peak,
            "rss_before_training": before, "peak_rss_training": resident_bytes("VmHWM"), "peak_rss_reset": peak_reset,
            "seconds_per_step": (time.perf_counter() - start) / args.steps}


def state_bytes_per_device(model, processes: int) -> tuple[float, float]:
    """(dense fine-tuning, RankDyna defaults) fp32 AdamW training state per device under FSDP2 over ``processes``
    devices, from the shapes: every parameter (factors, s, frozen factors, FFN weights, the rest) is sharded; the
    per-group gate, gate gradient and Fisher score (12 bytes a group or FFN channel) are replicated."""
    from rankdyna_trainer import RankDynaConfig
    from rankdyna_trainer.methods.rankdyna.model import initial_rank, trainable_rank
    from rankdyna_trainer.targets import ffn_channel_layers, find_target_linears, linear_shape

    config = RankDynaConfig(**CONFIG)
    linears = find_target_linears(model)
    channel_ffns = ffn_channel_layers(model, config.ffn_roles(model)) if config.resolved_ffn_groups(model) == \
        "channels" else {}
    whole = set(channel_ffns) | {p for producers in channel_ffns.values() for p in producers}
    targets = [linear_shape(l) for name, l in linears.items() if name not in whole]
    total = sum(p.numel() for p in model.parameters())
    sharded = 16 * (total - sum(m * n for m, n in targets))
    replicated = 12 * sum(linear_shape(linears[name])[1] for name in channel_ffns)
    for m, n in targets:
        k, r = trainable_rank(config, m, n), initial_rank(config, m, n)
        sharded += 16 * k * (m + n) + 4 * (r - k) * (m + n) + 16 * r
        replicated += 12 * r
    return 16 * total / processes, sharded / processes + replicated


def llama_7b():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def write_report(records: list[dict]) -> None:
    base = {r["rank"]: r for r in records if r["processes"] == 1}[0]
    command = "python scripts/bench_fsdp_memory.py " + " ".join(sys.argv[1:])
    lines = [
        "# Memory per process under FSDP2: RankDyna on SmolLM2-135M, 1 vs N processes",
        "",
        "Generated by `scripts/bench_fsdp_memory.py`; do not edit by hand.",
        "",
        f"- Command: `{command}` (under `flock /tmp/heavy.lock`), Python {platform.python_version()}, CPU, gloo, "
        "2 shared cores.",
        "- SmolLM2's output layer is untied from its embeddings (a separate copy, in every run), as when `shard_model` "
        "refused tied embeddings (it shards them now, docs/reliability.md).",
        f"- RankDyna defaults (FFN channels, attention singular groups, `factor_budget=1.0`, `fisher`), target 0.5; "
        f"{args.steps} AdamW steps (fp32) of a global batch of {args.global_batch} x {args.seq_len} random tokens "
        "through the real `Trainer`. N = 1: the unsharded model; N > 1: `shard_model(model, "
        "DistributedConfig(fsdp_size=N))` after `prepare_model`.",
        "- Training state: what the process holds, counted from its tensors: its shard of every trainable parameter "
        "x 4 (weight, gradient, Adam m and v), of every frozen parameter and of every buffer. Peak RSS also holds "
        "the Python/torch runtime (the same in every process), activations, FSDP's gathered layer during its "
        "forward/backward, and communication buffers.",
        "",
        "| processes | rank | training state (GiB) | x 1 process | RSS before training (GiB) | peak RSS training (GiB) "
        "| x 1 process | peak loading + preparing (GiB) | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["processes"], r["rank"])):
        lines.append(
            f"| {r['processes']} | {r['rank']} | {gib(r['training_state_bytes'])} | "
            f"**{r['training_state_bytes'] / base['training_state_bytes']:.2f}** | {gib(r['rss_before_training'])} | "
            f"{gib(r['peak_rss_training'])} | {r['peak_rss_training'] / base['peak_rss_training']:.2f} | "
            f"{gib(r['peak_rss_loading_preparing'])} | {r['seconds_per_step']:.1f} |")
    dense, rankdyna = state_bytes_per_device(llama_7b(), 8)
    dense1, rankdyna1 = state_bytes_per_device(llama_7b(), 1)
    lines += [
        "",
        "The loading + preparing peak is not sharded: every process loads and factorizes the full model before "
        "`shard_model` (docs/reliability.md, *Sharded training*).",
        "",
        "## LLaMA-7B on 8 devices (arithmetic)",
        "",
        "fp32 AdamW training state per device, counted from the shapes by `state_bytes_per_device` in this script: "
        "under FSDP2 every parameter (factors, singular values, frozen factors, FFN and other weights), its gradient "
        "and its Adam moments are split over the devices; the gates, gate gradients and Fisher scores (12 bytes per "
        "group or FFN channel) stay replicated. Activations and FSDP's gathered layer come on top.",
        "",
        "| devices | dense fine-tuning (GB per device) | RankDyna defaults (GB per device) | x dense |",
        "|---|---|---|---|",
        f"| 1 | {dense1 / 1e9:.2f} | {rankdyna1 / 1e9:.2f} | {rankdyna1 / dense1:.2f} |",
        f"| 8 | {dense / 1e9:.2f} | {rankdyna / 1e9:.2f} | {rankdyna / dense:.2f} |",
        "",
        f"So on 8 devices of 80 GB, RankDyna's training state is {rankdyna / 1e9:.1f} GB per device, leaving the rest "
        "for activations; one device could not hold it.",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.json, "w") as f:
        json.dump({"command": command, "records": records}, f, indent=2)


if __name__ == "__main__":
    if args.child:
        print("RECORD " + json.dumps(measure()), flush=True)
        sys.exit(0)
    records = []
    for n in args.processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   os.path.abspath(__file__), "--child", "--steps", str(args.steps), "--global-batch",
                   str(args.global_batch), "--seq-len", str(args.seq_len)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n)), "PYTHONPATH": REPO}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        found = [json.loads(l.split("RECORD ", 1)[1]) for l in done.stdout.splitlines() if "RECORD " in l]
        if done.returncode != 0 or len(found) != n:
            sys.exit(f"Measuring {n} process(es) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        records += found
        print(f"{n} process(es): " + ", ".join(f"rank {r['rank']} state {gib(r['training_state_bytes'])} GiB, "
                                               f"peak {gib(r['peak_rss_training'])} GiB" for r in found), flush=True)
    write_report(records)
