"""Cost of RankDyna per optimizer step, measured side by side with dense fine-tuning in one run.

    python scripts/bench_overhead.py --steps 10 --batch_size 32 --seq_len 128

Both models are the packaged MiniLM with a classification head; steps alternate dense / RankDyna so that
machine load affects both alike. The RankDyna step runs the real RankDynaCallback hook
(`on_pre_optimizer_step`: score update, and a reallocation every `--reallocation_interval` steps).
"""

import argparse
import statistics
import time

import torch
from transformers import BertForSequenceClassification, TrainerControl, TrainerState, TrainingArguments

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.packaged_models import minilm_path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--reallocation_interval", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = minilm_path()
    dense = BertForSequenceClassification.from_pretrained(path, num_labels=2).train()
    factorized = BertForSequenceClassification.from_pretrained(path, num_labels=2).train()
    config = RankDynaConfig(target_budget=0.5, warmup_fraction=0.0, final_fraction=0.0,
                            reallocation_interval=args.reallocation_interval)
    prepare_model(factorized, config)

    batch = {"input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len)),
             "labels": torch.randint(0, 2, (args.batch_size,))}
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (dense, factorized)}

    total = args.steps + 2
    callback = RankDynaCallback(config)
    train_args = TrainingArguments("/tmp/bench_overhead", use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=total), TrainerControl()
    callback.on_train_begin(train_args, state, control, model=factorized)

    times = {"dense": [], "rankdyna": [], "importance": [], "hook": []}
    for step in range(total):
        for name, model in (("dense", dense), ("rankdyna", factorized)):
            optimizer = optimizers[model]

            def train_step():
                model(**batch).loss.backward()
                if model is factorized:
                    state.global_step = step
                    times["hook"].append(timed(lambda: callback.on_pre_optimizer_step(
                        train_args, state, control, optimizer=optimizer)))
                optimizer.step()
                optimizer.zero_grad()

            times[name].append(timed(train_step))
        # The importance update alone, on the gradients of one more backward pass (not part of a step time).
        factorized(**batch).loss.backward()
        times["importance"].append(timed(callback.scores.update))
        callback.scores.zero_gate_grads()
        optimizers[factorized].zero_grad()

    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"seq {args.seq_len}, {args.steps} timed steps each (medians)")
    print(f"dense step            {med['dense'] * 1000:9.1f} ms")
    print(f"rankdyna step         {med['rankdyna'] * 1000:9.1f} ms")
    print(f"  callback hook       {med['hook'] * 1000:9.1f} ms (score update + reallocation every "
          f"{args.reallocation_interval} steps)")
    print(f"  importance update   {med['importance'] * 1000:9.1f} ms")
    print(f"ratio rankdyna/dense  {med['rankdyna'] / med['dense']:9.3f}")
    print(f"importance / rankdyna step {med['importance'] / med['rankdyna'] * 100:6.2f} %")


if __name__ == "__main__":
    main()
