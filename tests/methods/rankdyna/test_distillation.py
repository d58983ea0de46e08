"""Self-distillation (RankDynaConfig.distillation_weight): the model when pruning starts teaches the rest of the run.

Real Trainer runs on tiny random BERT and LLaMA models without dropout, so that forwards repeat exactly."""

import shutil

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from rankdyna_trainer.methods.rankdyna import RankDynaCallback, RankDynaConfig, prepare_model
from rankdyna_trainer.methods.rankdyna.distillation import TEACHER_FILE, distillation_sum, is_causal_lm
from tests.conftest import random_classification_dataset, tiny_bert
from tests.reliability.helpers import CrashAfterSave
from tests.tiny_models import ARCHITECTURES, training_dataset

WEIGHT, TEMPERATURE = 0.6, 2.0
STEPS, WARMUP = 12, 3  # warmup_fraction 0.25 of 12 steps: the teacher is taken at global_step 3


def config(**overrides) -> RankDynaConfig:
    settings = dict(target_budget=0.3, warmup_fraction=WARMUP / STEPS, final_fraction=0.25, reallocation_interval=2,
                    distillation_weight=WEIGHT, distillation_temperature=TEMPERATURE)
    settings.update(overrides)
    return RankDynaConfig(**settings)


def bert(num_labels: int = 2):
    model = tiny_bert(num_labels)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def llama():
    return ARCHITECTURES["llama"].build()


def lm_dataset(n: int = 16, length: int = 10) -> Dataset:
    """Random tokens whose labels hide a different number of positions per row (-100), so that a token mean over a
    micro-batch differs from one over the accumulated batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (n, length), generator=g)
    labels = ids.clone()
    for row in range(n):
        labels[row, : row % 5] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def regression_dataset(n: int = 48) -> Dataset:
    data = random_classification_dataset(n)
    return data.map(lambda row: {"labels": float(row["labels"]) + 0.5 * (row["input_ids"][1] / 128)})


def trainer_for(model, data, output_dir, rankdyna_config, callbacks=(), **overrides) -> Trainer:
    prepare_model(model, rankdyna_config)
    model.train()
    args = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                seed=0, data_seed=0, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=data,
                   callbacks=[RankDynaCallback(rankdyna_config), *callbacks])


def rankdyna_of(trainer) -> RankDynaCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RankDynaCallback))


def hand_loss(student, teacher, labels, task: str, num_items=None, weight=WEIGHT) -> torch.Tensor:
    """(1 - w) * task loss + w * the distillation term, written out from the definitions."""
    if task == "causal_lm":
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    if task == "regression":
        task_sum = ((student.squeeze(-1) - labels) ** 2).sum()
        term_sum = ((student - teacher) ** 2).sum()
        items = labels.numel()
    else:
        keep = labels != -100
        s, t, y = student[keep], teacher[keep], labels[keep]
        task_sum = -s.log_softmax(-1).gather(1, y[:, None]).sum()
        p_teacher = (t / TEMPERATURE).softmax(-1)
        kl = (p_teacher * (p_teacher.log() - (s / TEMPERATURE).log_softmax(-1))).sum()
        term_sum, items = TEMPERATURE ** 2 * kl, keep.sum()
    divisor = items if num_items is None else num_items
    return (1 - weight) * task_sum / divisor + weight * term_sum / divisor


class CheckDistillation(TrainerCallback):
    """At the snapshot, the student's logits on ``batch``; later, the loss the model returns on it in training mode
    against :func:`hand_loss`, and the teacher's logits and parameters against the snapshot."""

    def __init__(self, batch, task, check_step=WARMUP + 4):
        self.batch, self.task, self.check_step = batch, task, check_step
        self.at_snapshot = self.teacher_state = None
        self.checked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == WARMUP:  # RankDynaCallback runs first: the teacher has just been taken
            teacher = self.rankdyna.distillation.teacher
            with torch.no_grad():
                model.eval()
                self.at_snapshot = model(**self._inputs()).logits
                model.train()
            self.teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step != self.check_step:
            return
        distillation = self.rankdyna.distillation
        teacher, logged = distillation.teacher, (distillation._term_sum, distillation._items, distillation._task_sum)
        assert model.training and not teacher.training
        with torch.no_grad():
            out = model(**self.batch)
            teacher_logits = teacher(**self._inputs()).logits
            torch.testing.assert_close(out.loss, hand_loss(out.logits, teacher_logits, self.batch["labels"],
                                                           self.task))
            if self.task == "causal_lm":  # the Trainer's normalisation over an accumulated batch
                out = model(**self.batch, num_items_in_batch=torch.tensor(50))
                torch.testing.assert_close(out.loss, hand_loss(out.logits, teacher_logits, self.batch["labels"],
                                                               self.task, num_items=50))
        # The teacher is the model as it was when pruning started, frozen since.
        torch.testing.assert_close(teacher_logits, self.at_snapshot, rtol=1e-4, atol=1e-5)
        for key, value in teacher.state_dict().items():
            assert torch.equal(value, self.teacher_state[key]), key
        assert not any(p.requires_grad for p in teacher.parameters())
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert not in_optimizer & {id(p) for p in teacher.parameters()}
        assert not in_optimizer & {id(b) for b in teacher.buffers()}
        # These extra forwards must not reach the step's logged values.
        distillation._term_sum, distillation._items, distillation._task_sum = logged
        self.checked = True

    def _inputs(self):
        # The teacher's inputs as the hook gives them: an encoder-decoder keeps its labels (its decoder inputs).
        return self.batch if self.task == "seq2seq" else {k: v for k, v in self.batch.items() if k != "labels"}


def seq2seq_dataset(n: int = 16) -> Dataset:
    data = training_dataset("seq2seq", n=n)
    return data.map(lambda row, i: {"labels": [-100] * (i % 3) + row["labels"][i % 3:]}, with_indices=True)


# GPT-2: Conv1D layers (its FFN input becomes a Conv1D channel producer); T5: an encoder-decoder, whose decoder
# inputs come from the labels, which its teacher therefore keeps.
@pytest.mark.parametrize("task", ["classification", "regression", "causal_lm", "gpt2", "seq2seq"])
def test_loss_is_task_loss_plus_weighted_kl_to_the_frozen_teacher(tmp_path, task):
    model, data = {"classification": (bert(), random_classification_dataset(48)),
                   "regression": (bert(num_labels=1), regression_dataset()),
                   "causal_lm": (llama(), lm_dataset()),
                   "gpt2": (ARCHITECTURES["gpt2"].build(), lm_dataset()),
                   "seq2seq": (ARCHITECTURES["t5"].build(), seq2seq_dataset())}[task]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    # The Trainer counts GPT-2's items over all its labels (its loss_type is None, so the Trainer does not know the
    # loss shifts them): its loss, task and distillation parts alike, is then a per-item mean times items / count.
    per_item_loss = task != "gpt2"
    task = "causal_lm" if task == "gpt2" else task
    batch = {k: torch.tensor(v) for k, v in data[:4].items()}
    check = CheckDistillation(batch, task)
    trainer = trainer_for(model, data, tmp_path, config(), callbacks=[check])
    check.rankdyna = rankdyna_of(trainer)
    trainer.train()
    assert check.checked
    if task == "regression":
        assert model.config.problem_type == "regression"
    # The two parts are logged after the snapshot; the Trainer's loss is their weighted sum.
    logged = [h for h in trainer.state.log_history if "rankdyna/distillation_loss" in h]
    assert [h["step"] for h in logged] == list(range(WARMUP + 1, STEPS + 1))
    for h in logged if per_item_loss else []:
        mixed = (1 - WEIGHT) * h["rankdyna/task_loss"] + WEIGHT * h["rankdyna/distillation_loss"]
        assert h["loss"] == pytest.approx(mixed, rel=1e-4)
    assert logged[-1]["rankdyna/distillation_loss"] > 0
    # Training is over: the model's forward returns its own loss again, and the teacher is freed.
    assert not model._forward_hooks and rankdyna_of(trainer).distillation.teacher is None


@pytest.mark.parametrize("task", ["classification", "regression", "causal_lm", "seq2seq"])
def test_distillation_term_against_its_definition_on_logits_far_from_the_teacher(task):
    # The Trainer runs above use tiny random models, whose near-uniform logits give a KL near 0; here the two sides
    # differ widely, so the sum and the item count are checked tightly.
    g = torch.Generator().manual_seed(0)
    shape = {"classification": (6, 3), "regression": (6, 1)}.get(task, (3, 7, 11))
    student, teacher = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    if task == "regression":
        labels = torch.randn(6, generator=g)
    else:
        labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
        labels.view(-1)[::4] = -100
    term_sum, items = distillation_sum(student, teacher, labels, TEMPERATURE, task == "regression",
                                       shift_labels=task == "causal_lm")
    # hand_loss at weight 1 with num_items 1 is the term's sum, written out.
    expected = hand_loss(student, teacher, labels, task, num_items=1, weight=1.0)
    torch.testing.assert_close(term_sum, expected, rtol=1e-5, atol=1e-6)
    shifted = labels[:, 1:] if task == "causal_lm" else labels
    assert int(items) == (labels.numel() if task == "regression" else int((shifted != -100).sum()))


def test_causal_lms_are_told_apart_from_other_heads():
    # GPT-2's class name matches no transformers loss type (loss_type None), yet its loss shifts the labels.
    causal = {name for name, arch in ARCHITECTURES.items() if arch.task == "causal_lm"}
    assert "gpt2" in causal
    for name, arch in ARCHITECTURES.items():
        assert is_causal_lm(arch.build()) == (name in causal), name


@pytest.fixture(scope="module")
def distilled_bert(tmp_path_factory):
    """An uninterrupted distilled BERT run (compared with a plain run and with an interrupted one)."""
    trainer = trainer_for(bert(), random_classification_dataset(48), tmp_path_factory.mktemp("kd"), config())
    trainer.train()
    return trainer


def test_before_the_snapshot_the_loss_is_the_task_loss_exactly(tmp_path, distilled_bert):
    plain = trainer_for(bert(), random_classification_dataset(48), tmp_path / "plain", config(distillation_weight=0))
    plain.train()
    distilled = distilled_bert
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, distilled)]
    assert losses[0][:WARMUP] == losses[1][:WARMUP]  # steps 1..3 ran before the teacher was taken
    assert losses[0][WARMUP + 1:] != losses[1][WARMUP + 1:]
    assert not any("rankdyna/distillation_loss" in h for h in plain.state.log_history)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_accumulated_micro_batches_train_like_one_batch(tmp_path, task):
    # classification: BERT's mean loss (the Trainer divides by the accumulation steps); causal_lm: LLaMA takes the
    # Trainer's num_items_in_batch, and the rows hide different numbers of tokens.
    def run(name, **overrides):
        model, data = (bert(), random_classification_dataset(48)) if task == "classification" else (llama(),
                                                                                                    lm_dataset(48))
        if task == "classification":
            model.accepts_loss_kwargs = False  # BERT's loss ignores num_items_in_batch (tests/reliability/helpers)
        trainer = trainer_for(model, data, tmp_path / name, config(), **overrides)
        trainer.train()
        return trainer

    one, accumulated = run("b8", per_device_train_batch_size=8), run(
        "b4x2", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    a, b = one.model.state_dict(), accumulated.model.state_dict()
    gates = [k for k in a if k.endswith(".gate")]
    assert sum(int(a[k].sum()) for k in gates) < sum(a[k].numel() for k in gates), "no pruning happened"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    steps = lambda t: [(h["step"], h["rankdyna/distillation_loss"]) for h in t.state.log_history  # noqa: E731
                       if "rankdyna/distillation_loss" in h]
    for (step_a, term_a), (step_b, term_b) in zip(steps(one), steps(accumulated), strict=True):
        assert step_a == step_b and term_a == pytest.approx(term_b, rel=1e-2, abs=1e-6)  # a near-0 KL: noisy


def test_resume_after_the_snapshot_continues_with_the_saved_teacher(tmp_path, distilled_bert):
    def build(out, callbacks=(), **overrides):
        return trainer_for(bert(), random_classification_dataset(48), out, config(), callbacks, **overrides)

    full = distilled_bert
    crash = WARMUP + 3
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "run", [CrashAfterSave(crash)], save_strategy="steps", save_steps=crash).train()
    checkpoint = tmp_path / "run" / f"checkpoint-{crash}"
    assert (checkpoint / TEACHER_FILE).is_file()

    # Fresh model, fresh Trainer, from a copy of the checkpoint outside output_dir: the teacher is read from the
    # folder the Trainer resumes from.
    copied = tmp_path / "copied" / "step"
    shutil.copytree(checkpoint, copied)
    resumed = build(tmp_path / "elsewhere")
    resumed.train(resume_from_checkpoint=str(copied))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    logged = lambda t: {h["step"]: h["rankdyna/distillation_loss"] for h in t.state.log_history  # noqa: E731
                        if "rankdyna/distillation_loss" in h and h["step"] > crash}
    assert logged(resumed).keys() == logged(full).keys()
    for step, value in logged(full).items():
        assert logged(resumed)[step] == pytest.approx(value, rel=1e-4, abs=1e-9)

    # A checkpoint after the snapshot without the teacher cannot resume this run: said before any step.
    (checkpoint / TEACHER_FILE).unlink()
    refused = build(tmp_path / "run")
    with pytest.raises(ValueError, match=f"after its distillation teacher was taken .*holds no {TEACHER_FILE}"):
        refused.train(resume_from_checkpoint=str(checkpoint))
    assert refused.state.global_step == crash


@pytest.mark.parametrize("field, value, message", [
    ("distillation_weight", -0.1, r"distillation_weight must be a number in \[0, 1\].*got -0.1"),
    ("distillation_weight", 1.5, r"distillation_weight must be .*got 1.5"),
    ("distillation_weight", True, r"distillation_weight must be .*got True"),
    ("distillation_temperature", 0.0, r"distillation_temperature must be a finite number > 0, got 0.0"),
    ("distillation_temperature", float("inf"), r"distillation_temperature must be .*got inf"),
])
def test_bad_distillation_values_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        RankDynaConfig(**{field: value})


def test_label_smoothing_and_multi_label_heads_are_refused_before_training(tmp_path):
    trainer = trainer_for(bert(), random_classification_dataset(48), tmp_path, config(), label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        trainer.train()
    assert trainer.state.global_step == 0
    multi_label = bert(num_labels=3)
    multi_label.config.problem_type = "multi_label_classification"
    trainer = trainer_for(multi_label, random_classification_dataset(48), tmp_path, config())
    with pytest.raises(ValueError, match="does not support multi-label"):
        trainer.train()
    assert trainer.state.global_step == 0
