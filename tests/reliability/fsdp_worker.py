"""One process of the 2-process FSDP2 RankDyna runs driven by test_fsdp.py (also importable: the cases and the
single-process reference live here so both sides build the same run).

    torchrun --nproc_per_node 2 tests/reliability/fsdp_worker.py OUT_DIR           # the uninterrupted runs
    torchrun --nproc_per_node 2 tests/reliability/fsdp_worker.py OUT_DIR resume    # resume each from step 5

For each case (tiny LLaMA with FFN channels and the 'fisher' score, untied and tied embeddings; tiny BERT with
singular groups and the 'sensitivity' score) every process loads OUT_DIR/<case>/base (saved by the test), runs
prepare_model, then shard_model (FSDP2 over the 2 processes), trains with the real Trainer (checkpoints at steps 5
and 10 into OUT_DIR/<case>/trainer, RankDyna's resume state of the case's state-dict type included), gathers the
model on process 0, exports it and saves it. Dumps, per process, OUT_DIR/<case>/allocations_rank{r}.json (masks and
group scores at every reallocation, losses, RNG state at every step) and, on process 0, gathered_logits.pt,
final_state.pt (the gathered state dict) and exported/ (save_pretrained).

``resume``: a fresh model and Trainer per case resume from OUT_DIR/<case>/resumed/checkpoint-5 (the test copies
checkpoint-5 there) and finish; the same files, prefixed ``resumed_``.
"""

import json
import os
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for `tests.*` and the package

from rankdyna_trainer.methods.rankdyna import (  # noqa: E402
    RankDynaCallback,
    RankDynaConfig,
    export_model,
    gated_layers,
    gather_unsharded_model,
    prepare_model,
    shard_model,
)
from tests.tiny_models import ARCHITECTURES, example_inputs, training_dataset  # noqa: E402

STEPS, GLOBAL_BATCH = 10, 4
RESUME_AT = 5  # inside the pruning phase: masks already shrunk at steps 2 and 4, reallocations at 6 and 8 to come
# name -> (architecture, RankDyna settings, fsdp_plan): BERT has no fsdp plan for its layers in transformers
# (the default names `layers.*`), so the test passes one.
CASES = {
    "llama_channels_fisher": ("llama", dict(importance="fisher", ffn_groups="channels"), None),
    "llama_tied_channels_fisher": ("llama-tied", dict(importance="fisher", ffn_groups="channels"), None),
    "bert_singular_sensitivity": ("bert", dict(importance="sensitivity", ffn_groups="singular"),
                                  {"bert.encoder.layer.*": "free_full_weight"}),
}
# The resume state each case's checkpoints carry (RankDynaCallback(sharded_checkpoint=...)).
STATE_DICT_TYPES = {"llama_channels_fisher": "sharded", "llama_tied_channels_fisher": "full",
                    "bert_singular_sensitivity": "full"}
AUTO = {"AutoModelForCausalLM": AutoModelForCausalLM,
        "AutoModelForSequenceClassification": AutoModelForSequenceClassification}


def rankdyna_config(case: str) -> RankDynaConfig:
    # The exact start (untrained groups frozen) on every model kind: the frozen factors' sharding is under test.
    return RankDynaConfig(target_budget=0.4, warmup_fraction=0.2, final_fraction=0.2, reallocation_interval=2,
                          init="svd", untrained_groups="frozen", **CASES[case][1])


def save_base_model(case: str, directory: Path) -> None:
    architecture = ARCHITECTURES[CASES[case][0]]
    model = architecture.build(seed=0)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(model.config, name):  # no dropout, so the sharded and the single-process runs can agree
            setattr(model.config, name, 0.0)
    model.save_pretrained(directory)


def load_prepared(case: str, directory: Path):
    architecture = ARCHITECTURES[CASES[case][0]]
    model = AUTO[architecture.auto_class].from_pretrained(directory)
    prepare_model(model, rankdyna_config(case))
    model.accepts_loss_kwargs = False  # a plain mean loss per batch, so 2 x 2 examples average like 4
    return model


class CountRankDynaCollectives:
    """Counts the collectives that RankDyna's own code issues (not FSDP's), by wrapping torch.distributed's."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
            setattr(dist, name, self._counted(name, getattr(dist, name)))

    def _counted(self, name, collective):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("rankdyna_trainer"):
                self.counts[name] = self.counts.get(name, 0) + 1
            return collective(*args, **kwargs)
        return wrapper

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


COLLECTIVES = CountRankDynaCollectives() if __name__ == "__main__" else None


class DumpAllocations(TrainerCallback):
    """Runs after RankDynaCallback (which puts itself first), so it sees each new allocation; also records the
    collectives RankDyna issued during each optimizer step."""

    def __init__(self, rankdyna: RankDynaCallback):
        self.rankdyna, self.records, self.collectives = rankdyna, [], []
        self.losses, self.rng = {}, {}

    def on_step_begin(self, args, state, control, **kwargs):
        # The resumed run's generators must continue where the uninterrupted run's were.
        self.rng[state.global_step] = [torch.random.get_rng_state().tolist(), repr(random.getstate())]

    def on_step_end(self, args, state, control, **kwargs):
        # Draw from the global generators every step, as dropout would (the runs have none, so that the sharded and
        # the one-process runs agree): without the restored RNG state the resumed run would then draw differently.
        torch.rand(1), random.random()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if COLLECTIVES is not None:  # what RankDynaCallback.on_pre_optimizer_step just issued
            self.collectives.append({"step": state.global_step, **COLLECTIVES.take(),
                                     "scored": self.rankdyna.budget.tracks_scores(state.global_step)})
        if self.rankdyna.budget.is_reallocation_step(state.global_step):
            self.records.append({
                "step": state.global_step,
                "gates": [l.gate.tolist() for l in gated_layers(model).values()],
                "scores": [s.tolist() for s in self.rankdyna.scores.group_scores()],
                "budget": self.rankdyna.budget.params_at(state.global_step),
            })
        if COLLECTIVES is not None:
            COLLECTIVES.take()  # this dump's own group_scores() all-reduce is not RankDyna's


def train(case: str, model, output_dir: Path, per_device_batch: int, checkpoints: bool = False,
          resume_from: Path | None = None) -> tuple[DumpAllocations, list[dict]]:
    architecture = ARCHITECTURES[CASES[case][0]]
    # The Trainer checkpoints a sharded model only with save_only_model=True (it refuses anything else);
    # RankDynaCallback adds the optimizer, scheduler and RNG state.
    saving = dict(save_strategy="steps", save_steps=RESUME_AT, save_only_model=True) if checkpoints else dict(
        save_strategy="no")
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=per_device_batch, learning_rate=1e-3,
        seed=0, data_seed=0, report_to=[], logging_steps=1, use_cpu=True, **saving,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    rankdyna = RankDynaCallback(rankdyna_config(case), sharded_checkpoint=STATE_DICT_TYPES[case])
    dump = DumpAllocations(rankdyna)
    model.train()
    trainer = Trainer(model=model, args=args, callbacks=[rankdyna, dump],
                      train_dataset=training_dataset(architecture.task, n=STEPS * GLOBAL_BATCH, seed=0))
    if COLLECTIVES is not None:
        COLLECTIVES.take()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return dump, dump.collectives


def dump_run(folder: Path, prefix: str, rank: int, dump: DumpAllocations) -> None:
    record = {"allocations": dump.records, "losses": dump.losses, "rng": dump.rng}
    (folder / f"{prefix}allocations_rank{rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    from transformers.distributed import DistributedConfig

    rank = int(os.environ["RANK"])
    refusals = {"prepare_model_on_a_sharded_model":
                refusal_of_prepare_on_sharded(out / "llama_channels_fisher" / "base")}
    for case, (arch, _, fsdp_plan) in CASES.items():
        folder = out / case
        model = load_prepared(case, folder / "base")
        shard_model(model, DistributedConfig(fsdp_size=2, fsdp_plan=fsdp_plan))
        if case == "llama_channels_fisher":
            refusals["orth_reg_on_a_sharded_model"] = refusal_of_orth_reg(model)
            refusals["trainer_checkpoint_of_a_sharded_model"] = refusal_of_full_trainer_checkpoint(model, folder)
        dump, collectives = train(case, model, folder / "trainer", per_device_batch=GLOBAL_BATCH // 2,
                                  checkpoints=True)
        (folder / f"layout_rank{rank}.json").write_text(json.dumps(layout(model)))
        dump_run(folder, "", rank, dump)
        (folder / f"collectives_rank{rank}.json").write_text(json.dumps(collectives))
        save_gathered(model, folder, "", arch, export=True)
    (out / f"refusals_rank{rank}.json").write_text(json.dumps(refusals))


def resume(out: Path) -> None:
    """A fresh model and Trainer per case, resumed from the copied checkpoint-5 (every later step to the end)."""
    from transformers.distributed import DistributedConfig

    rank = int(os.environ["RANK"])
    for case, (arch, _, fsdp_plan) in CASES.items():
        folder = out / case
        model = load_prepared(case, folder / "base")
        shard_model(model, DistributedConfig(fsdp_size=2, fsdp_plan=fsdp_plan))
        dump, _ = train(case, model, folder / "resumed", per_device_batch=GLOBAL_BATCH // 2, checkpoints=True,
                        resume_from=folder / "resumed" / f"checkpoint-{RESUME_AT}")
        dump_run(folder, "resumed_", rank, dump)
        save_gathered(model, folder, "resumed_", arch, export=False)
    (out / f"resume_refusals_rank{rank}.json").write_text(json.dumps(
        {"other_world_size": refusal_of_another_world_size(out / "llama_channels_fisher")}))


def save_gathered(model, folder: Path, prefix: str, arch: str, export: bool) -> None:
    """On process 0: the gathered model's state dict (every parameter and buffer) and, with ``export``, its logits
    before and after export_model and the exported folder."""
    full = gather_unsharded_model(model)
    if full is not None:
        torch.save({k: v.clone() for k, v in full.state_dict().items()}, folder / f"{prefix}final_state.pt")
        if export:
            full.eval()
            inputs = example_inputs(ARCHITECTURES[arch].task)
            with torch.no_grad():
                gathered = full(**inputs).logits
                export_model(full)
                exported = full(**inputs).logits
            torch.save({"gathered": gathered, "exported": exported}, folder / "gathered_logits.pt")
            full.save_pretrained(folder / "exported")
    dist.barrier()


def layout(model) -> dict:
    """Which tensors are sharded (DTensor) after training, and this rank's share of the elements."""
    from torch.distributed.tensor import DTensor

    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {
        "tied_embeddings": model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if model.get_output_embeddings() is not None else False,
        "plain_parameters": [n for n, p in model.named_parameters() if not isinstance(p, DTensor)],
        "sharded_buffers": sorted(n for n, b in model.named_buffers() if isinstance(b, DTensor)),
        "frozen_factors": sorted(n for n in tensors if n.endswith(("U_frozen", "V_frozen"))),
        "frozen_factors_sharded": all(isinstance(tensors[n], DTensor) for n in tensors
                                      if n.endswith(("U_frozen", "V_frozen"))),
        "local_elements": sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors.values()),
        "global_elements": sum(t.numel() for t in tensors.values()),
    }


def refusal_of_prepare_on_sharded(base: Path) -> str:
    """prepare_model on a model that from_pretrained(distributed_config=...) sharded at load time."""
    from transformers.distributed import DistributedConfig

    model = AutoModelForCausalLM.from_pretrained(base, distributed_config=DistributedConfig(fsdp_size=2))
    try:
        prepare_model(model, rankdyna_config("llama_channels_fisher"))
    except ValueError as error:
        return str(error)
    return "not refused"


def refusal_of_full_trainer_checkpoint(model, folder: Path) -> str:
    """transformers' own refusal: a Trainer that would checkpoint the optimizer of a model sharded at load time."""
    args = TrainingArguments(str(folder / "unused"), use_cpu=True, report_to=[], save_strategy="steps",
                             ddp_backend="gloo")
    try:
        Trainer(model=model, args=args)
    except ValueError as error:
        return str(error)
    return "not refused"


def refusal_of_another_world_size(folder: Path) -> str:
    """load_resume_state on a checkpoint whose resume state says it was written by 3 processes."""
    from rankdyna_trainer.methods.rankdyna.sharded_checkpoint import RESUME_FILE, load_resume_state

    checkpoint = folder / f"written_by_3_rank{dist.get_rank()}"
    checkpoint.mkdir()
    (checkpoint / RESUME_FILE).write_text(json.dumps({"state_dict_type": "sharded", "world_size": 3}))
    try:
        load_resume_state(str(checkpoint), None, None, None, step=RESUME_AT)
    except ValueError as error:
        return str(error)
    return "not refused"


def refusal_of_orth_reg(model) -> str:
    from transformers import TrainerControl, TrainerState

    args = TrainingArguments("unused", use_cpu=True, report_to=[])
    try:
        RankDynaCallback(RankDynaConfig(orth_reg_weight=0.1)).on_train_begin(
            args, TrainerState(max_steps=STEPS), TrainerControl(), model=model)
    except ValueError as error:
        return str(error)
    return "not refused"


if __name__ == "__main__":
    (resume if sys.argv[2:] == ["resume"] else main)(Path(sys.argv[1]))
