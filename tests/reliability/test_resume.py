"""Resume: a run interrupted right after a checkpoint and resumed ends where the uninterrupted run ends."""

import json

import pytest
import torch
from transformers import TrainerCallback

from rankdyna_trainer.methods.rankdyna import RANK_PATTERN_FILE, svd_layers

from .helpers import CrashAfterSave, build_trainer, gates, state_of


class RecordAllocations(TrainerCallback):
    """Rank pattern after every optimizer step, to compare whole allocation histories."""

    def __init__(self):
        self.history = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.history[state.global_step] = {n: int(l.gate.sum()) for n, l in svd_layers(model).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    recorder = RecordAllocations()
    trainer = build_trainer(out, callbacks=[recorder])
    trainer.train()
    with open(out / RANK_PATTERN_FILE) as f:
        pattern = json.load(f)
    return state_of(trainer.model), gates(trainer.model), recorder.history, pattern


# 6: mid-epoch while pruning; 10: epoch boundary (40 examples / batch 4); 17: inside the frozen final phase.
@pytest.mark.parametrize("crash_step", [6, 10, 17])
def test_resumed_run_matches_uninterrupted(tmp_path, uninterrupted, crash_step):
    full_state, full_gates, full_history, full_pattern = uninterrupted
    with pytest.raises(KeyboardInterrupt):
        build_trainer(tmp_path, callbacks=[CrashAfterSave(crash_step)], save_strategy="steps",
                      save_steps=crash_step).train()
    checkpoint = tmp_path / f"checkpoint-{crash_step}"
    assert (checkpoint / RANK_PATTERN_FILE).is_file()

    recorder = RecordAllocations()
    resumed = build_trainer(tmp_path, callbacks=[recorder])  # fresh model, fresh Trainer
    resumed.train(resume_from_checkpoint=str(checkpoint))

    # Allocation history after the resume point is the uninterrupted one, step by step.
    assert min(recorder.history) == crash_step + 1
    for step, ranks in recorder.history.items():
        assert ranks == full_history[step], f"rank pattern differs at step {step}"
    for name, gate in gates(resumed.model).items():
        assert torch.equal(gate, full_gates[name]), name
    # Weights and importance statistics (buffers) agree within float tolerance.
    resumed_state = state_of(resumed.model)
    assert resumed_state.keys() == full_state.keys()
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    with open(tmp_path / RANK_PATTERN_FILE) as f:
        assert json.load(f) == full_pattern


def test_checkpoint_carries_importance_state_and_not_gate_grad(tmp_path):
    from safetensors.torch import load_file

    with pytest.raises(KeyboardInterrupt):
        build_trainer(tmp_path, callbacks=[CrashAfterSave(6)], save_strategy="steps", save_steps=6).train()
    saved = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    layer_keys = [k for k in saved if k.endswith(".gate")]
    assert layer_keys, "gate masks missing from the checkpoint"
    prefix = layer_keys[0][: -len("gate")]
    for part in ("U", "V", "gate"):
        for stat in ("sensitivity", "uncertainty"):
            assert saved[f"{prefix}{stat}_{part}"].abs().sum() > 0, f"{stat}_{part} not saved or still zero"
    assert not any(k.endswith("gate_grad") for k in saved)
    # At step 6 the budget has already shrunk, so the saved masks are not all ones.
    assert sum(int(saved[k].sum()) for k in layer_keys) < sum(saved[k].numel() for k in layer_keys)
