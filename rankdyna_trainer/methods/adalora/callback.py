from __future__ import annotations

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """Drives peft's AdaLoRA budget from the Trainer, which never calls ``update_and_allocate`` itself.

    peft wants the call after ``optimizer.step()`` and before ``zero_grad()`` (its scores read the
    gradients): that is the Trainer's ``on_optimizer_step`` event. ``state.global_step`` there still counts
    the steps finished before this one, i.e. the 0-based index of the step, as in peft's own loop.
    """

    def __init__(self):
        self.rank_history: list[dict] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if logs is None or model is None:
            return
        pattern = model.peft_config[model.active_adapter].rank_pattern
        if pattern:
            logs["adalora/total_rank"] = int(sum(sum(mask) for mask in pattern.values()))
