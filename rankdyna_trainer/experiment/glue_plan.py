"""The GLUE campaign's plan: which runs, in what order, under which file names, and how long each one trains.

``scripts/benchmark_glue.py`` runs the plan; :mod:`glue_report` reads the files it names. Every method trains one
protocol round (the task's PROTOCOL epochs), except the equal-work rows of :data:`EQUAL_WORK`: ``rankdyna_equal``
is the ``rankdyna`` run (same config, seeds, dev sets and floors) given as many optimizer steps as FWSVD's two
rounds together. FWSVD's run is the dense round of its seed (the protocol's epochs) plus its own second round (the
protocol's epochs again), so ``rankdyna_equal`` trains twice the protocol's epochs in one run. An ``--epochs``
override changes the round of every method, so it changes both sides: under ``--epochs E`` FWSVD trains E + E and
``rankdyna_equal`` 2E. Steps are counted as the Trainer counts them, ``ceil(epochs x batches per epoch)``, which is
why the epochs must be whole: a fractional round would round twice on FWSVD's side and once on RankDyna's.
"""

from __future__ import annotations

import math
import os

UNCOMPRESSED = ("dense", "adalora")
# Campaign rows that run a library method for several protocol rounds in one run: row -> (the method it runs, how
# many rounds of work it gets).
EQUAL_WORK = {"rankdyna_equal": ("rankdyna", 2)}
IN_TRAINING_ORDER = ["rankdyna", "rankdyna_equal", "fwsvd", "svd", "tfwsvd", "ars"]  # per budget, after dense
TAKES_RANK_MULTIPLE = ("rankdyna", "rankdyna_equal", "svd", "fwsvd", "tfwsvd", "ars")
TAKES_FFN_GROUPS = ("rankdyna", "rankdyna_equal")


def trained_method(method: str) -> str:
    """The library method a campaign row runs: ``rankdyna`` for ``rankdyna_equal``, else the row itself."""
    return EQUAL_WORK.get(method, (method, 1))[0]


def rounds_of_work(method: str) -> int:
    """Protocol rounds of training a row's one run gets (1 but for the equal-work rows)."""
    return EQUAL_WORK.get(method, (method, 1))[1]


def run_epochs(method: str, round_epochs: float) -> float:
    """The epochs a row's run trains, given the epochs of the protocol round (PROTOCOL's, or ``--epochs``)."""
    return rounds_of_work(method) * round_epochs


def check_whole_epochs(methods: list[str], round_epochs: float | None) -> None:
    """Refuse an equal-work row with a fractional round: its steps would not equal FWSVD's two rounds."""
    equal = [m for m in methods if m in EQUAL_WORK]
    if equal and round_epochs is not None and round_epochs != int(round_epochs):
        raise ValueError(f"--epochs {round_epochs:g} with {', '.join(equal)}: an equal-work run trains "
                         f"{rounds_of_work(equal[0])} x the round's epochs in one run, and its optimizer steps equal "
                         f"FWSVD's two rounds only when the round is whole epochs; give an integer")


def round_steps(train_rows: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of one run of ``epochs`` on ``train_rows`` rows, as the Trainer counts them on one device:
    ``ceil(epochs x ceil(rows / batch))``."""
    return math.ceil(epochs * math.ceil(train_rows / batch_size))


def fwsvd_steps(protocol: dict) -> int:
    """Optimizer steps of a post-hoc run (FWSVD's): its dense round plus its own round, each the protocol's."""
    return 2 * round_steps(protocol["train_rows_used"], protocol["batch_size"], protocol["epochs"])


def method_tag(method: str, rank_multiple: int, ffn_groups: str = "channels",
               attention_groups: str = "channels") -> str:
    """The row as run files and the summary name it: ``+m8`` for ranks in multiples of 8, ``+singular`` for RankDyna
    with singular groups in the FFNs too, ``+attn_singular`` for RankDyna with singular groups in the attention
    instead of its per-head channels (the groups the library's default ``'auto'`` takes on MiniLM, for both)
    (glue_report.run_key reads the same from the run record)."""
    tag = f"{method}+m{rank_multiple}" if rank_multiple > 1 and method in TAKES_RANK_MULTIPLE else method
    if method in TAKES_FFN_GROUPS and ffn_groups == "singular":
        tag = f"{tag}+singular"
    return f"{tag}+attn_singular" if method in TAKES_FFN_GROUPS and attention_groups == "singular" else tag


def run_path(results_dir, task, method, budget, seed, rank_multiple=1, ffn_groups="channels",
             attention_groups="channels") -> str:
    budget_tag = "na" if method in UNCOMPRESSED else f"{budget:g}"
    tag = method_tag(method, rank_multiple, ffn_groups, attention_groups)
    return os.path.join(results_dir, task, f"{tag}_b{budget_tag}_seed{seed}.json")


def run_plan(tasks, methods, budgets, seeds) -> list[tuple[str, str, float | None, int]]:
    """Seed by seed and task by task: dense first (the post-hoc methods start from it), then every budget, AdaLoRA
    last, so each (task, seed) group is complete before the next begins."""
    plan = []
    for seed in seeds:
        for task in tasks:
            if "dense" in methods:
                plan.append((task, "dense", None, seed))
            plan += [(task, m, b, seed) for b in budgets for m in IN_TRAINING_ORDER if m in methods]
            if "adalora" in methods:
                plan.append((task, "adalora", None, seed))
    return plan


def step_counter():
    """A Trainer callback that keeps the optimizer steps its run took (``state.global_step`` at the end, in
    ``.steps``), so a run file records what was trained rather than what was planned. Built on call so that reading
    the plan needs no transformers import."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps: int | None = None

        def on_train_end(self, args, state, control, **kwargs):
            self.steps = state.global_step

    return StepCounter()
