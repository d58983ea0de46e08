"""One process of the 2-process FSDP2 RankDyna runs driven by test_fsdp.py (also importable: the cases and the
single-process reference live here so both sides build the same run).

    torchrun --nproc_per_node 2 tests/reliability/fsdp_worker.py OUT_DIR

For each case (tiny LLaMA with FFN channels and the 'fisher' score; tiny BERT with singular groups and the
'sensitivity' score) every process loads OUT_DIR/<case>/base (saved by the test), runs prepare_model, then
shard_model (FSDP2 over the 2 processes), trains with the real Trainer, gathers the model on process 0, exports it
and saves it. Dumps, per process, OUT_DIR/<case>/allocations_rank{r}.json (masks and group scores at every
reallocation) and, on process 0, OUT_DIR/<case>/gathered_logits.pt and OUT_DIR/<case>/exported (save_pretrained).
"""

import json
import os
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
# name -> (architecture, RankDyna settings, fsdp_plan): BERT has no fsdp plan for its layers in transformers
# (the default names `layers.*`), so the test passes one.
CASES = {
    "llama_channels_fisher": ("llama", dict(importance="fisher", ffn_groups="channels"), None),
    "bert_singular_sensitivity": ("bert", dict(importance="sensitivity", ffn_groups="singular"),
                                  {"bert.encoder.layer.*": "free_full_weight"}),
}
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


def train(case: str, model, output_dir: Path, per_device_batch: int) -> list[dict]:
    architecture = ARCHITECTURES[CASES[case][0]]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=per_device_batch, learning_rate=1e-3,
        seed=0, data_seed=0, report_to=[], save_strategy="no", logging_steps=5, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    rankdyna = RankDynaCallback(rankdyna_config(case))
    dump = DumpAllocations(rankdyna)
    model.train()
    trainer = Trainer(model=model, args=args, callbacks=[rankdyna, dump],
                      train_dataset=training_dataset(architecture.task, n=STEPS * GLOBAL_BATCH, seed=0))
    if COLLECTIVES is not None:
        COLLECTIVES.take()
    trainer.train()
    return dump.records, dump.collectives


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
        records, collectives = train(case, model, folder / f"trainer_rank{rank}", per_device_batch=GLOBAL_BATCH // 2)
        (folder / f"layout_rank{rank}.json").write_text(json.dumps(layout(model)))
        (folder / f"allocations_rank{rank}.json").write_text(json.dumps(records))
        (folder / f"collectives_rank{rank}.json").write_text(json.dumps(collectives))
        full = gather_unsharded_model(model)
        if full is not None:
            full.eval()
            inputs = example_inputs(ARCHITECTURES[arch].task)
            with torch.no_grad():
                gathered = full(**inputs).logits
                export_model(full)
                exported = full(**inputs).logits
            torch.save({"gathered": gathered, "exported": exported}, folder / "gathered_logits.pt")
            full.save_pretrained(folder / "exported")
        dist.barrier()
    (out / f"refusals_rank{rank}.json").write_text(json.dumps(refusals))


def layout(model) -> dict:
    """Which tensors are sharded (DTensor) after training, and this rank's share of the elements."""
    from torch.distributed.tensor import DTensor

    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {
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
    main(Path(sys.argv[1]))
