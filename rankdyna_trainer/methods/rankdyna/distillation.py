"""Self-distillation inside the one RankDyna run: the model as it is when pruning starts teaches the pruned model.

At the end of the warm-up the model is dense and tuned on the task, so it is the teacher a second round would have
trained, without the second round. :class:`SelfDistillation` keeps a frozen, dense copy of it and, on every training
forward after that, replaces the model's loss by

    (1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the items the task loss counts (labels != -100: a classification example, or a causal LM's next-token position;
a regression head, ``problem_type == "regression"``, uses the squared error to the teacher's output instead of the KL).
The term is normalised as the task loss is: a mean over the micro-batch's items, or a sum divided by the
``num_items_in_batch`` the Trainer passes to models that take loss kwargs, so gradient accumulation and the Trainer's
loss scaling treat it exactly like the task loss.

It works with the plain ``transformers.Trainer``: a forward hook on the top-level model (the module inside DDP and
``torch.compile`` wrappers) runs the teacher on the same inputs and sets ``outputs.loss``, which is what the Trainer
backpropagates. The teacher is no submodule of the model: DDP, the optimizer and ``save_pretrained`` never see it, and
it runs no collective. Checkpoints carry it (:data:`TEACHER_FILE`), so a run resumed after the snapshot continues with
the same teacher.
"""

from __future__ import annotations

import copy
import inspect
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from ...targets import unwrap_model
from .layer import ChannelGroups, ChannelProducerConv1D, SVDLinear
from .model import gated_layers

TEACHER_FILE = "rankdyna_teacher.safetensors"
IGNORE_INDEX = -100
# What the teacher is not given: the targets (its loss is not needed) and the Trainer's loss normalisation.
STUDENT_ONLY_INPUTS = ("labels", "shift_labels", "num_items_in_batch")


def dense_teacher(model: nn.Module) -> nn.Module:
    """A frozen, dense copy of ``model`` (eval mode, no gradients): each factorized matrix as the ``nn.Linear`` of
    the weight its gates keep, each channel-gated FFN or attention as plain layers. Dense layers cost a dense forward
    and dense memory, where the factors at full rank would cost up to twice both."""
    model = unwrap_model(model)
    replacements = {}
    with torch.no_grad():
        for layer in gated_layers(model).values():
            replacements[id(layer)] = _dense_layer(layer)
            if isinstance(layer, ChannelGroups):  # the FFNs' and the attention's producers
                for name in layer.producers:
                    producer = model.get_submodule(name)
                    replacements[id(producer)] = _plain_producer(producer)
        # deepcopy takes a module found in its memo as already copied: the gated layers (and their statistics) are
        # never copied, only their dense replacements are placed.
        teacher = copy.deepcopy(model, memo=replacements)
    _drop_top_level_hooks(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _drop_top_level_hooks(teacher: nn.Module) -> None:
    """The copy carries the model's hooks: keep the submodules' (transformers records outputs with them) and drop the
    top-level ones, where this module's own hook and a user's instrumentation of the training forward live."""
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                 "_forward_pre_hooks_with_kwargs"):
        hooks = getattr(teacher, name, None)
        if hooks is not None:
            setattr(teacher, name, type(hooks)())  # a new dict: the model's own must not be emptied


def _dense_layer(layer: SVDLinear | ChannelGroups) -> nn.Linear:
    if isinstance(layer, SVDLinear):
        return _linear(layer.effective_weight(), layer.bias)
    return _linear(*layer.gated_weight())


def _plain_producer(producer: nn.Module) -> nn.Module:
    if isinstance(producer, ChannelProducerConv1D):
        with torch.device("meta"):
            plain = Conv1D(producer.nf, producer.nx)
        plain.weight = nn.Parameter(producer.weight.detach().clone())
        plain.bias = nn.Parameter(producer.bias.detach().clone())
        return plain
    return _linear(producer.weight, producer.bias)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):  # no allocation nor init: the weights are set below
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone())
    linear.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    return linear


def distillation_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                     regression: bool, shift_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The distillation term summed over the items the task loss counts, and their number.

    ``labels`` selects the items (``!= -100``); with ``shift_labels`` (causal LMs) position ``i`` of the logits is
    scored where ``labels[i + 1]`` is a target, as the causal LM loss does. A regression head's term is the squared
    error to the teacher's outputs; any other head's is ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.
    """
    student, teacher = student.float(), teacher.float()
    if regression:
        error = (student - teacher).reshape(student.shape[0], -1).pow(2).sum()
        return error, torch.tensor(student.shape[0], device=student.device)
    if shift_labels:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"RankDyna distillation: labels of shape {tuple(labels.shape)} do not match the logits of "
                         f"shape {tuple(student.shape)} (one label per logit row expected).")
    items = labels != IGNORE_INDEX
    student_log = F.log_softmax(student[items] / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher[items] / temperature, dim=-1)
    kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="sum")
    return temperature ** 2 * kl, items.sum()


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts its labels (a decoder-only LM). Its ``loss_type`` says so when the class name
    ends like one of transformers' loss types (``LlamaForCausalLM``); older class names such as ``GPT2LMHeadModel``
    have none (their loss falls back to the causal LM one) and are found in the causal LM auto mapping."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss or \
        type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


class SelfDistillation:
    """The teacher (once taken) and the forward hook that adds its term to the model's loss while training."""

    def __init__(self, model: nn.Module, weight: float, temperature: float):
        self.model = unwrap_model(model)
        self.weight, self.temperature = float(weight), float(temperature)
        self.teacher: nn.Module | None = None
        self._hook = None
        self._shift_labels = is_causal_lm(self.model)
        self._reset_logged()

    # -- the teacher ------------------------------------------------------------------------------
    def take_teacher(self) -> None:
        """Snapshot the model as it is now as the teacher, and start distilling."""
        self._attach(dense_teacher(self.model))

    def load_teacher(self, checkpoint: str) -> None:
        """The teacher saved in ``checkpoint`` (by :meth:`save_teacher`), for a run resumed after the snapshot."""
        from safetensors.torch import load_model

        path = os.path.join(checkpoint, TEACHER_FILE)
        teacher = dense_teacher(self.model)  # the teacher's structure; its weights come from the file
        load_model(teacher, path, device=str(next(teacher.parameters()).device))
        self._attach(teacher)

    def save_teacher(self, checkpoint: str) -> None:
        from safetensors.torch import save_model

        os.makedirs(checkpoint, exist_ok=True)
        save_model(self.teacher, os.path.join(checkpoint, TEACHER_FILE))  # handles tied weights

    def _attach(self, teacher: nn.Module) -> None:
        self.teacher = teacher
        self._teacher_inputs = inspect.signature(teacher.forward).parameters
        if self._hook is None:
            self._hook = self.model.register_forward_hook(self._distill, with_kwargs=True)

    def close(self) -> None:
        """Stop distilling and free the teacher (the end of training: the model's forward is the user's again)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self.teacher = None, None

    # -- the loss ---------------------------------------------------------------------------------
    @torch.compiler.disable  # the teacher runs eagerly beside a compiled student (a graph break at the hook)
    def _distill(self, module, args, kwargs, outputs):
        if not module.training:
            return outputs
        loss = outputs["loss"] if isinstance(outputs, dict) else (outputs[0] if isinstance(outputs, tuple) else None)
        labels = kwargs.get("labels")
        if loss is None or labels is None:
            raise ValueError("RankDyna distillation needs the model to compute its task loss (labels in the batch, "
                             "no compute_loss_func or label smoothing in the Trainer); got a training forward "
                             "without " + ("labels." if labels is None else "a loss."))
        with torch.no_grad():
            teacher_out = self.teacher(*args, **self._inputs_for_teacher(kwargs))
        student_logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        teacher_logits = teacher_out["logits"] if isinstance(teacher_out, dict) else teacher_out[0]
        term_sum, items = distillation_sum(student_logits, teacher_logits.detach(), labels, self.temperature,
                                           self._is_regression(), self._shift_labels)
        # The task loss's normalisation: over the whole accumulated batch when the Trainer passes its item count.
        count = kwargs.get("num_items_in_batch")
        divisor = (items if count is None else torch.as_tensor(count, device=items.device)).clamp_min(1)
        term = term_sum / divisor
        total = (1 - self.weight) * loss + self.weight * term
        self._log(term_sum, items, loss * divisor)
        if isinstance(outputs, dict):
            outputs["loss"] = total
            return outputs
        return (total,) + tuple(outputs[1:])

    def _inputs_for_teacher(self, kwargs: dict) -> dict:
        # An encoder-decoder builds its decoder inputs from the labels when none are given: keep them for the teacher.
        keeps_labels = getattr(self.model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in kwargs
        dropped = STUDENT_ONLY_INPUTS[1:] if keeps_labels else STUDENT_ONLY_INPUTS
        inputs = {k: v for k, v in kwargs.items() if k not in dropped}
        if "use_cache" in self._teacher_inputs and "use_cache" not in inputs:
            inputs["use_cache"] = False  # one forward: a key/value cache would only take memory
        return inputs

    def _is_regression(self) -> bool:
        problem = getattr(self.model.config, "problem_type", None)
        if problem == "multi_label_classification":
            raise ValueError("RankDyna distillation does not support multi-label classification heads "
                             "(problem_type='multi_label_classification'); set distillation_weight=0.")
        return problem == "regression"

    # -- what is logged ---------------------------------------------------------------------------
    def _reset_logged(self) -> None:
        self._term_sum = self._items = self._task_sum = None

    def _log(self, term_sum: torch.Tensor, items: torch.Tensor, task_sum: torch.Tensor) -> None:
        # Device tensors, read once per logging step (no host sync per step).
        values = (term_sum.detach(), items.detach().float(), task_sum.detach().float())
        if self._term_sum is None:
            self._term_sum, self._items, self._task_sum = values
        else:
            self._term_sum, self._items, self._task_sum = (a + b for a, b in zip(
                (self._term_sum, self._items, self._task_sum), values))

    def logged_values(self) -> dict[str, float]:
        """The distillation term and the task loss per item since the last call (``rankdyna/...``), or ``{}``."""
        if self._term_sum is None:
            return {}
        term_sum, items, task_sum = torch.stack([self._term_sum, self._items, self._task_sum]).tolist()
        self._reset_logged()
        if items == 0:
            return {}
        return {"rankdyna/distillation_loss": term_sum / items, "rankdyna/task_loss": task_sum / items}
