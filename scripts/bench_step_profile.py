"""One training step of the packaged MiniLM, dense against RankDyna with hand-set kept fractions, split into forward,
backward and optimizer time (medians; the settings take turns step by step in one process).

    python scripts/bench_step_profile.py --kept 1,1 1,0.5 1,0.33 1,0.2
    python scripts/bench_step_profile.py --attention_groups singular --kept 1,1 0.25,0.5 0.1,0.2

Each ``--kept S,C`` keeps the leading fraction ``S`` of every factorized matrix's singular groups and ``C`` of every
channel-pruned layer's channels (the FFNs', and with the default ``--attention_groups auto`` on MiniLM the attentions'
per-head q/k and v/o channels, so that no matrix is factorized and ``S`` has nothing to act on), on the kept-groups
compute path, as training at that allocation runs it. ``--ranks_from FILE`` adds the allocation a real run ended
with (a GLUE campaign run file's ``ranks``, or a run's ``rank_pattern.json``): its kept count per layer, which a global
allocation spreads unevenly (early layers near full, late ones far below), unlike ``--kept``'s uniform fractions.

    python scripts/bench_step_profile.py --kept 1,0.5 \
        --ranks_from benchmarks/glue_protocol/sst2/rankdyna_b0.5_seed1.json

``--scoring on off`` profiles each ``--kept`` point as a scored step (the gates get their gradients: default) and as
an unscored one (the warm-up's first steps and the final phase), to price the scoring itself.

    python scripts/bench_step_profile.py --kept 1,1 1,0.3 --scoring on off --steps 24 --seq_len 64

``--schedule_bound B ...`` then prints, per target budget ``B``, the mean step cost over the main job's run (500
optimizer steps, the encoder defaults' schedule) if every step cost what this profile measured at its kept fraction
(``rankdyna_trainer.experiment.run_cost.schedule_step_cost``): what the schedule allows, whatever else the run does.
It needs ``--kept`` points ``1,C`` from the lowest budget up to ``1,1``.

    python scripts/bench_step_profile.py --kept 1,1 1,0.9 1,0.8 1,0.7 1,0.5 1,0.33 1,0.2 --schedule_bound 0.5 0.33 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


SCORINGS = ("on", "off")


def kept_fractions(text: str) -> tuple[float, float]:
    try:
        singular, channels = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kept takes S,C (two fractions), got {text!r}") from None
    if not (0 < singular <= 1 and 0 < channels <= 1):
        raise argparse.ArgumentTypeError(f"--kept fractions must be in (0, 1], got {text!r}")
    return singular, channels


def read_ranks(path: str) -> dict[str, int]:
    """Kept groups per gated layer from a campaign run file or a ``rank_pattern.json`` (both keep them under
    ``ranks``)."""
    with open(path) as f:
        ranks = json.load(f).get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError(f"--ranks_from {path}: no 'ranks' mapping of layer names to kept counts")
    return ranks


def set_gates(layers: dict, kept) -> None:
    """Gates keeping the leading groups of each layer: ``kept`` as (singular, channel) fractions, or kept counts by
    layer name (which groups are kept does not change the cost, only how many)."""
    import torch

    from rankdyna_trainer.methods.rankdyna import SVDLinear

    if isinstance(kept, dict) and set(kept) != set(layers):
        missing, unknown = sorted(set(layers) - set(kept)), sorted(set(kept) - set(layers))
        raise ValueError(f"--ranks_from: its layers ({len(kept)}) are not this model's gated layers ({len(layers)}); "
                         f"missing: {missing[:3]}, unknown: {unknown[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            if isinstance(kept, dict):
                count = kept[name]
            else:
                count = max(1, int((kept[0] if isinstance(layer, SVDLinear) else kept[1]) * layer.gate.numel()))
            layer.gate.zero_()
            layer.gate[:count] = 1


def build(kept: tuple[float, float] | dict[str, int] | None, attention_groups: str = "auto", scoring: str = "on"):
    import torch
    from transformers import AutoModelForSequenceClassification

    from rankdyna_trainer import RankDynaConfig, prepare_model
    from rankdyna_trainer.methods.rankdyna import gated_layers
    from rankdyna_trainer.methods.rankdyna.kept_compute import KeptCompute
    from rankdyna_trainer.packaged_models import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).train()
    if kept is not None:
        prepare_model(model, RankDynaConfig(attention_groups=attention_groups))
        layers = gated_layers(model)
        set_gates(layers, kept)
        KeptCompute(model, list(layers.values())).use_kept(True)
        for layer in layers.values():
            layer.gate_scored = scoring != "off"
    return model, trainer_optimizer(model)


def trainer_optimizer(model):
    """The optimizer ``transformers.Trainer`` builds by default (on this torch, fused AdamW): a hand-built
    ``torch.optim.AdamW`` runs its per-parameter loop on the CPU, 6-7x slower, and would overstate the part of a step
    that does not shrink with the budget."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, use_cpu=True, learning_rate=1e-5, report_to=[])
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return optimizer_cls([p for p in model.parameters() if p.requires_grad], **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kept", nargs="+", type=kept_fractions, default=[(1.0, 1.0), (0.25, 0.5), (0.1, 0.2)])
    parser.add_argument("--ranks_from", nargs="*", default=[], metavar="FILE",
                        help="also profile the allocation a run ended with (a campaign run file or rank_pattern.json)")
    parser.add_argument("--schedule_bound", nargs="*", type=float, default=[], metavar="B",
                        help="target budgets whose run-level step cost to estimate from the --kept 1,C points")
    parser.add_argument("--total_steps", type=int, default=500, help="--schedule_bound: the run's optimizer steps")
    parser.add_argument("--warmup_fraction", type=float, default=None,
                        help="--schedule_bound: the run's warm-up (default: the encoder defaults', 0.3)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8, help="steps per setting; the first two are not timed")
    parser.add_argument("--attention_groups", choices=["auto", "singular"], default="auto",
                        help="RankDynaConfig.attention_groups: 'auto' (the default) is per-head channels on MiniLM")
    parser.add_argument("--scoring", nargs="+", choices=SCORINGS, default=["on"],
                        help="'on': the gates get their gradients (a scored step: warm-up from its score start, "
                        "pruning), 'off': they do not (an unscored step); both: each --kept point once per mode")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (two warm-up steps), got {args.steps}")
    if args.warmup_fraction is not None and not 0 <= args.warmup_fraction < 1:
        parser.error(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction:g}")
    channel_points = sorted(c for s, c in args.kept if s == 1.0)
    for budget in args.schedule_bound:
        if not 0 < budget < 1 or not channel_points or channel_points[-1] != 1.0 or channel_points[0] > budget:
            parser.error(f"--schedule_bound {budget:g}: needs a budget in (0, 1) and --kept points 1,C from {budget:g} "
                         f"up to 1,1 (got 1,C for C in {channel_points})")
    try:
        allocations = {f"ranks of {os.path.basename(path)}": read_ranks(path) for path in args.ranks_from}
    except OSError as error:
        parser.error(f"--ranks_from: cannot read {error.filename}: {error.strerror}")
    except ValueError as error:
        parser.error(str(error))

    import torch

    ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (args.batch_size,), generator=torch.Generator().manual_seed(1))

    def named(name: str, scoring: str) -> str:
        return name if len(args.scoring) == 1 else f"{name} ({scoring})"

    settings = {"dense": build(None)} | {
        named(f"kept {s:g} / {c:g}", mode): build((s, c), args.attention_groups, mode)
        for s, c in args.kept for mode in args.scoring}
    settings |= {named(name, mode): build(ranks, args.attention_groups, mode)
                 for name, ranks in allocations.items() for mode in args.scoring}
    medians = step_medians(settings, ids, labels, args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}, "
          f"attention_groups={args.attention_groups}, scoring={' / '.join(args.scoring)}")
    print(step_table(medians))
    if args.schedule_bound:
        dense = sum(medians["dense"])
        step_cost = {c: sum(medians[named(f"kept 1 / {c:g}", args.scoring[0])]) / dense for c in channel_points}
        print(schedule_bounds(step_cost, args.schedule_bound, args.total_steps, args.warmup_fraction))
    return 0


def step_medians(settings: dict, ids, labels, steps: int) -> dict[str, list[float]]:
    """Median forward, backward and optimizer seconds of each ``{name: (model, optimizer)}``, the settings taking
    turns step by step (so that the machine's drift falls on all of them alike); the first two steps are not timed."""
    times = {name: [] for name in settings}
    for step in range(steps):
        for name, (model, optimizer) in settings.items():
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:
                times[name].append((forward - start, backward - forward, time.perf_counter() - backward))
    return {n: [statistics.median(t[i] for t in ts) for i in range(3)] for n, ts in times.items()}


def step_table(medians: dict[str, list[float]]) -> str:
    """A markdown table of :func:`step_medians`, with each total over the ``dense`` setting's."""
    lines = ["| step (s) | " + " | ".join(medians) + " |", "|---|" + "---|" * len(medians)]
    for i, part in enumerate(("forward", "backward", "optimizer (the Trainer's default)")):
        lines.append(f"| {part} | " + " | ".join(f"{m[i]:.3f}" for m in medians.values()) + " |")
    dense = sum(medians["dense"])
    lines.append("| total, of dense | " + " | ".join(f"{sum(m) / dense:.2f}" for m in medians.values()) + " |")
    return "\n".join(lines)


def schedule_bounds(step_cost: dict[float, float], budgets: list[float], total_steps: int,
                    warmup: float | None = None) -> str:
    """One line per budget: the mean step cost of a run on the encoder defaults' schedule (or ``warmup``) at these
    step costs."""
    from rankdyna_trainer import RankDynaConfig
    from rankdyna_trainer.budget import ParameterBudget
    from rankdyna_trainer.experiment.run_cost import schedule_step_cost
    from rankdyna_trainer.methods.rankdyna.defaults import ENCODER, kind_defaults, reallocation_interval_for

    if warmup is None:
        warmup = kind_defaults(ENCODER, 0.5)["warmup_fraction"]
    final = RankDynaConfig().final_fraction
    lines = [f"A run of {total_steps} steps at these step costs (warm-up {warmup:g}, final {final:g}, cubic descent, "
             "reallocation steps run every group):"]
    for budget in budgets:
        schedule = ParameterBudget.from_fractions(1, 1.0, budget, total_steps, warmup, final)
        interval = reallocation_interval_for(schedule.final_start - schedule.warmup_steps)
        schedule = ParameterBudget.from_fractions(1, 1.0, budget, total_steps, warmup, final, interval)
        lines.append(f"  budget {budget:g}: {schedule_step_cost(step_cost, schedule):.2f} of dense")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
