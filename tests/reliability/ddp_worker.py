"""One process of the 2-process RankDyna run driven by test_multiprocess.py.

    torchrun --nproc_per_node 2 tests/reliability/ddp_worker.py OUT_DIR

Every process trains with its own Trainer output_dir (OUT_DIR/trainer_rank{r}) so that any file a
process other than 0 writes is visible, and dumps what the test compares to OUT_DIR/dumps (these dumps are
the test's own instrumentation, written by every process):
  allocations_rank{r}.json   masks and group scores after every reallocation
  microbatches_rank{r}.json  gate_grad at the end of each micro-batch's backward and at the next forward
  final_rank{r}.safetensors  the final state dict

The run distils (distillation_weight 0.5, teacher taken at step 2): each process runs its own copy of the teacher
beside DDP, with no collective, and process 0 alone saves it in the checkpoints.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repository root, for `tests.*` and the package

from rankdyna_trainer.methods.rankdyna import RankDynaCallback, svd_layers  # noqa: E402
from tests.reliability.helpers import build_trainer, small_config  # noqa: E402


class DumpAllocations(TrainerCallback):
    """Runs after RankDynaCallback (which puts itself first), so it sees each new allocation."""

    def __init__(self, rankdyna: RankDynaCallback):
        self.rankdyna, self.records = rankdyna, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.rankdyna.budget.is_reallocation_step(state.global_step):
            self.records.append({
                "step": state.global_step,
                "gates": [l.gate.tolist() for l in svd_layers(model).values()],
                "scores": [s.tolist() for s in self.rankdyna.scores.group_scores()],
            })


class WatchGateGrads(TrainerCallback):
    """gate_grad after each micro-batch's backward and at the start of the following forward (after DDP's
    own pre-forward work), to catch anything that overwrites the accumulated sum in between."""

    def __init__(self):
        self.after_backward, self.at_forward, self.model = [], [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        first = next(iter(svd_layers(model).values()))
        model.register_forward_pre_hook(lambda module, inputs: self.at_forward.append(first.gate_grad.tolist()))
        self.first = first

    def on_substep_end(self, args, state, control, **kwargs):
        self.after_backward.append(self.first.gate_grad.tolist())


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    trainer = build_trainer(out / f"trainer_rank{rank}", small_config(distillation_weight=0.5), n_examples=64,
                            gradient_accumulation_steps=2,
                            save_strategy="steps", save_steps=10, ddp_backend="gloo",
                            # DDP then syncs (and would broadcast buffers) on every micro-batch, the setting
                            # in which a broadcast gate_grad would be overwritten between micro-batches.
                            accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}})
    rankdyna = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RankDynaCallback))
    allocations, gate_grads = DumpAllocations(rankdyna), WatchGateGrads()
    trainer.add_callback(allocations)
    trainer.add_callback(gate_grads)
    trainer.train()
    trainer.save_model()  # writes on process 0 only

    dumps = out / "dumps"
    dumps.mkdir(exist_ok=True)
    (dumps / f"allocations_rank{rank}.json").write_text(json.dumps(allocations.records))
    (dumps / f"microbatches_rank{rank}.json").write_text(
        json.dumps({"after_backward": gate_grads.after_backward, "at_forward": gate_grads.at_forward}))
    state = {k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, str(dumps / f"final_rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
