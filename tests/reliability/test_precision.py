"""Gradient accumulation and mixed precision: optimizer-step schedule, unscaled gradients in the scores."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainerCallback, TrainerControl, TrainerState

from rankdyna_trainer.methods.rankdyna import RankDynaCallback, kept_params, prepare_model, svd_layers

from .helpers import build_trainer, small_config, state_of, tiny_bert_without_dropout, training_args


def _rankdyna(trainer) -> RankDynaCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RankDynaCallback))


class CountOptimizerSteps(TrainerCallback):
    def __init__(self):
        self.steps, self.kept = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(state.global_step)
        self.kept.append(sum(int(l.gate.sum()) for l in svd_layers(model).values()))


def test_schedule_counts_optimizer_steps_not_micro_batches(tmp_path):
    counter = CountOptimizerSteps()
    # 40 examples, batch 4, accumulation 2, 2 epochs: 20 micro-batches per epoch... 10 optimizer steps in all.
    trainer = build_trainer(tmp_path, callbacks=[counter], max_steps=-1, num_train_epochs=2,
                            gradient_accumulation_steps=2)
    trainer.train()
    budget = _rankdyna(trainer).budget
    assert trainer.state.max_steps == 10 and budget.total_steps == 10
    assert counter.steps == list(range(10))
    # Masks change only at the schedule's reallocation steps, counted in optimizer steps.
    changed = {step for step, before, after in zip(counter.steps[1:], counter.kept, counter.kept[1:])
               if before != after}
    assert changed and changed <= {s for s in range(10) if budget.is_reallocation_step(s)}
    assert kept_params(list(svd_layers(trainer.model).values())) <= budget.params_at(9)


def test_accumulated_micro_batches_score_like_one_batch(tmp_path):
    # Same 8 examples per optimizer step either way (same seed, same shuffled order); mean loss.
    one_batch = build_trainer(tmp_path / "b8", dropout=False, max_steps=6, per_device_train_batch_size=8)
    accumulated = build_trainer(tmp_path / "b4x2", dropout=False, max_steps=6, per_device_train_batch_size=4,
                                gradient_accumulation_steps=2)
    one_batch.train()
    accumulated.train()
    a, b = state_of(one_batch.model), state_of(accumulated.model)
    gates = [k for k in a if k.endswith(".gate")]
    assert sum(int(a[k].sum()) for k in gates) < sum(a[k].numel() for k in gates), "no pruning happened"
    for key in a:
        if "sensitivity" in key or "uncertainty" in key or key.endswith(".gate"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_bf16_autocast_on_cpu_gives_finite_scores_and_meets_budget(tmp_path):
    trainer = build_trainer(tmp_path, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    rankdyna = _rankdyna(trainer)
    scores = rankdyna.scores.group_scores()
    assert all(s.isfinite().all() for s in scores)
    assert sum(float(s.sum()) for s in scores) > 0
    assert int(rankdyna.scores.skipped_steps) == 0
    layers = list(svd_layers(trainer.model).values())
    assert kept_params(layers) <= rankdyna.budget.params_at(trainer.state.global_step)
    assert kept_params(layers) < rankdyna.budget.dense_params * 0.5


def _scores_after_one_step(tmp_path, loss_scale=None, unscaled_by_clipping=False):
    """Run one scoring step by hand with accelerate's optimizer wrapper and (optionally) a real GradScaler."""
    config = small_config()
    model = prepare_model(tiny_bert_without_dropout(), config).train()
    callback = RankDynaCallback(config)
    args, state, control = training_args(tmp_path), TrainerState(max_steps=20), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=(ids[:, 0] >= 64).long()).loss
    inner = torch.optim.AdamW(model.parameters())
    accelerator = Accelerator(cpu=True)  # AcceleratedOptimizer reads accelerate's global state; keep it alive
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else None
    optimizer = AcceleratedOptimizer(inner, scaler=scaler)
    (scaler.scale(loss) if scaler else loss).backward()
    if unscaled_by_clipping:
        scaler.unscale_(inner)  # what accelerate's clip_grad_norm_ does when max_grad_norm > 0
    callback.on_pre_optimizer_step(args, state, control, optimizer=optimizer, model=model)
    del accelerator
    return {k: v for k, v in state_of(model).items() if "sensitivity" in k}


@pytest.mark.parametrize("unscaled_by_clipping", [False, True], ids=["no-clipping", "clipping"])
def test_fp16_loss_scale_does_not_reach_the_scores(tmp_path, unscaled_by_clipping):
    reference = _scores_after_one_step(tmp_path)
    scaled = _scores_after_one_step(tmp_path, loss_scale=2.0**12, unscaled_by_clipping=unscaled_by_clipping)
    assert any(v.abs().sum() > 0 for v in reference.values())
    for key, value in reference.items():
        torch.testing.assert_close(scaled[key], value, rtol=1e-5, atol=1e-9, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_scores_like_plain_backward(tmp_path, use_reentrant):
    # Checkpointing re-runs each layer's forward during backward; the gate gradient must still be counted once.
    plain = build_trainer(tmp_path / "plain", dropout=False, max_steps=6)
    checkpointed = build_trainer(tmp_path / "ckpt", dropout=False, max_steps=6, gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    calls = []
    next(iter(svd_layers(checkpointed.model).values())).register_forward_hook(lambda *_: calls.append(1))
    plain.train()
    checkpointed.train()
    assert len(calls) == 2 * 6, "each layer's forward should run twice per step (forward + recomputation)"
    a, b = state_of(plain.model), state_of(checkpointed.model)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "sensitivity_gate" in k)
    for key in a:
        if "sensitivity" in key or "uncertainty" in key or key.endswith(".gate"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-7, msg=lambda m: f"{key}: {m}")
