"""Faults: non-finite gradients, rank-0 layers, a crash during a save, damaged or mismatched saved models."""

import json
import logging

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainerCallback

from rankdyna_trainer.export import LowRankLinear
from rankdyna_trainer.methods.rankdyna import (
    RANK_PATTERN_FILE,
    RankDynaCallback,
    RankDynaConfig,
    export_model,
    kept_params,
    prepare_model,
    svd_layers,
)
from rankdyna_trainer.quantizer import (
    LowRankCompressionConfig,
    load_compressed_model,
    read_compression_config,
    save_compressed_model,
)
from rankdyna_trainer.resume import last_complete_checkpoint
from tests.conftest import tiny_bert, tiny_llama

from .helpers import build_trainer, state_of

FAULT_STEP = 5  # inside the pruning phase of the 20-step schedule


class RecordStatistics(TrainerCallback):
    def __init__(self):
        self.after_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step[state.global_step] = {k: v for k, v in state_of(model).items()
                                              if "sensitivity" in k or "uncertainty" in k}


class NaNGateGradTrainer(Trainer):
    """Puts a NaN into one gate gradient on one step. Gate gradients feed only the scores, never the
    optimizer, so the weights stay healthy and training continues normally."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.state.global_step == FAULT_STEP:
            next(iter(svd_layers(self.model).values())).gate_grad[0] = float("nan")
        return loss


class InfWeightGradTrainer(Trainer):
    """Puts an inf into one U gradient on one step: the optimizer then spreads NaN through the weights and
    every later gradient is NaN too."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.state.global_step == FAULT_STEP:
            next(iter(svd_layers(self.model).values())).U.grad[0, 0] = float("inf")
        return loss


def _rankdyna(trainer):
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RankDynaCallback))


def test_non_finite_gate_gradient_skips_one_score_update_and_warns(tmp_path, caplog):
    recorder = RecordStatistics()
    trainer = build_trainer(tmp_path, callbacks=[recorder], trainer_class=NaNGateGradTrainer)
    with caplog.at_level(logging.WARNING, logger="rankdyna_trainer.methods.rankdyna.callback"):
        trainer.train()
    before, at_fault, after = (recorder.after_step[s] for s in (FAULT_STEP, FAULT_STEP + 1, FAULT_STEP + 2))
    for key in before:  # after_step[s] is the state after the optimizer step numbered s - 1
        assert torch.equal(at_fault[key], before[key]), f"{key} changed on the non-finite step"
        assert torch.isfinite(after[key]).all()
    assert any(not torch.equal(after[k], at_fault[k]) for k in at_fault), "scores stopped updating"
    rankdyna = _rankdyna(trainer)
    assert int(rankdyna.scores.skipped_steps) == 1
    assert "skipped 1 optimizer step(s) with non-finite gradients" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    layers = list(svd_layers(trainer.model).values())
    assert kept_params(layers) <= rankdyna.budget.params_at(trainer.state.global_step)


def test_diverged_weights_leave_scores_finite_and_allocation_within_budget(tmp_path):
    recorder = RecordStatistics()
    trainer = build_trainer(tmp_path, callbacks=[recorder], trainer_class=InfWeightGradTrainer, max_grad_norm=0.0)
    trainer.train()
    assert not torch.isfinite(next(iter(svd_layers(trainer.model).values())).U).all(), "fault not injected"
    rankdyna = _rankdyna(trainer)
    # Every score-tracking step from the fault on is skipped, and the statistics stay as they were before it.
    tracked = [s for s in range(FAULT_STEP, trainer.state.global_step) if rankdyna.budget.tracks_scores(s)]
    assert int(rankdyna.scores.skipped_steps) == len(tracked)
    frozen = recorder.after_step[FAULT_STEP]
    for key, value in state_of(trainer.model).items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert all(s.isfinite().all() for s in rankdyna.scores.group_scores())
    layers = list(svd_layers(trainer.model).values())
    assert kept_params(layers) <= rankdyna.budget.params_at(trainer.state.global_step)


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_llama], ids=["bert-with-bias", "llama-no-bias"])
def test_layer_allocated_rank_zero_exports_and_reloads(tmp_path, make_model):
    model = prepare_model(make_model(), RankDynaConfig(attention_groups="singular"))
    layers = svd_layers(model)
    names = list(layers)
    layers[names[0]].gate.zero_()  # rank 0
    layers[names[1]].gate[3:] = 0  # rank 3
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    modules = export_model(model)
    assert modules[names[0]]["type"] == "low_rank" and modules[names[0]]["rank"] == 0
    assert modules[names[1]]["rank"] == 3
    save_compressed_model(model, str(tmp_path), modules, "rankdyna")
    reloaded = load_compressed_model(str(tmp_path))
    layer = reloaded.get_submodule(names[0])
    assert isinstance(layer, LowRankLinear) and layer.rank == 0
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        x = torch.randn(3, layer.in_features)
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        torch.testing.assert_close(layer(x), bias.expand(3, -1))  # a rank-0 layer outputs its bias


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    uninterrupted = build_trainer(tmp_path / "full")
    uninterrupted.train()

    out = tmp_path / "crashed"
    # A folder where the optimizer state file should go makes the save of checkpoint-10 fail half-way,
    # after the model weights are written (a stand-in for a full disk or a killed job).
    (out / "checkpoint-10" / "optimizer.pt").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="Is a directory"):
        build_trainer(out, save_strategy="steps", save_steps=5).train()
    assert (out / "checkpoint-10" / "model.safetensors").is_file()
    assert not (out / "checkpoint-10" / RANK_PATTERN_FILE).exists()

    # transformers' resume_from_checkpoint=True picks the newest folder, the partial one, and stops loudly.
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        build_trainer(out).train(resume_from_checkpoint=True)
    checkpoint = last_complete_checkpoint(str(out))
    assert checkpoint == str(out / "checkpoint-5")

    resumed = build_trainer(out)
    resumed.train(resume_from_checkpoint=checkpoint)
    full, again = state_of(uninterrupted.model), state_of(resumed.model)
    for key, value in full.items():
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_last_complete_checkpoint_without_checkpoints(tmp_path):
    assert last_complete_checkpoint(str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        last_complete_checkpoint(str(tmp_path / "missing"))


# -- damaged or mismatched compressed models -----------------------------------------------------------
# The layout lives in config.json's quantization_config; transformers reads it when from_pretrained starts.
QUERY = "bert.encoder.layer.0.attention.self.query"


@pytest.fixture
def saved_model(tmp_path):
    model = prepare_model(tiny_bert(), RankDynaConfig(attention_groups="singular"))
    for layer in svd_layers(model).values():
        layer.gate[4:] = 0
    export_model(model)
    model.save_pretrained(str(tmp_path))
    return tmp_path


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_layout(folder, edit):
    _edit_json(folder / "config.json", lambda d: edit(d["quantization_config"]))


def _load(folder):
    return BertForSequenceClassification.from_pretrained(str(folder))


def test_rank_that_disagrees_with_the_weights_is_reported(saved_model):
    _edit_layout(saved_model, lambda q: q["modules"][QUERY].update(rank=3))
    # transformers' own shape check: its load report lists the key, the error says to read it.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _load(saved_model)


@pytest.mark.parametrize("entry, message", [
    ({"type": "low_rank", "in_features": 32, "out_features": 32, "bias": True}, "missing 'rank'"),
    ({"type": "low_rank", "in_features": 32, "rank": -1, "out_features": 32, "bias": True}, "rank=-1"),
    ({"type": "svd", "in_features": 32, "out_features": 32}, "unknown type 'svd'"),
])
def test_malformed_module_entry_is_reported(saved_model, entry, message):
    _edit_layout(saved_model, lambda q: q["modules"].__setitem__(QUERY, entry))
    with pytest.raises(ValueError, match=message):
        _load(saved_model)


def test_layout_of_another_format_version_is_reported(saved_model):
    _edit_layout(saved_model, lambda q: q.update(format_version=1))
    with pytest.raises(ValueError, match="format_version=1; this rankdyna_trainer reads format_version 2"):
        _load(saved_model)


def test_layout_for_another_architecture_is_reported(saved_model):
    _edit_json(saved_model / "config.json", lambda d: d.update(num_hidden_layers=1))
    with pytest.raises(ValueError, match="does not exist in BertForSequenceClassification"):
        _load(saved_model)


def test_weights_of_another_width_are_reported(saved_model):
    _edit_json(saved_model / "config.json", lambda d: d.update(hidden_size=48, num_attention_heads=2))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _load(saved_model)


def test_folder_without_a_layout_is_not_a_compressed_model(tmp_path):
    tiny_bert().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="holds no rankdyna compression layout"):
        read_compression_config(str(tmp_path))


def test_layout_passed_for_a_dense_checkpoint_is_refused(tmp_path):
    tiny_bert().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="only describes a model saved in compressed form"):
        BertForSequenceClassification.from_pretrained(str(tmp_path), quantization_config=LowRankCompressionConfig())
