from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...budget import ParameterBudget, allocate_by_cost
from ...targets import unwrap_model
from .config import RankDynaConfig
from .defaults import (
    AUTO,
    MAX_REALLOCATION_INTERVAL,
    MODEL_KIND_FIELDS,
    REALLOCATIONS_PER_PHASE,
    auto_fields,
    reallocation_interval_for,
    resolve_model_kind,
    with_values,
)
from .distillation import TEACHER_FILE, SelfDistillation
from .importance import SingularGroupScores, memory_steps
from .kept_compute import KeptCompute
from .layer import SVDLinear
from .model import dense_params, gated_layers, kept_params, layer_ranks, pruned_away, rank_pattern
from .sharded_checkpoint import check_state_dict_type, load_resume_state, save_resume_state
from .sharding import is_sharded, shard_statistics_like_parameters

logger = logging.getLogger(__name__)

RANK_PATTERN_FILE = "rank_pattern.json"


class RankDynaCallback(TrainerCallback):
    """Scores singular groups every optimizer step and reallocates ranks under a shrinking global budget.

    Use with a model passed through :func:`prepare_model`::

        model = prepare_model(model, config)
        trainer = Trainer(model=model, args=args, ..., callbacks=[RankDynaCallback(config)])

    ``sharded_checkpoint`` only matters for a sharded (FSDP2) model, whose optimizer the Trainer does not checkpoint:
    ``"sharded"`` (DCP, each rank its shards) or ``"full"`` (gathered on rank 0) writes the optimizer, scheduler and
    RNG state into each checkpoint so that ``trainer.train(resume_from_checkpoint=...)`` resumes exactly; ``None``
    writes none (see :mod:`.sharded_checkpoint`).
    """

    def __init__(self, config: RankDynaConfig | None = None, sharded_checkpoint: str | None = "sharded"):
        check_state_dict_type(sharded_checkpoint)
        self.config = config
        self.sharded_checkpoint = sharded_checkpoint
        self.budget: ParameterBudget | None = None
        self.scores: SingularGroupScores | None = None
        self._layers = []
        self._names = []
        self._reported_skips = 0
        self._warned_zero: set[str] = set()
        self.distillation: SelfDistillation | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_first_among_callbacks()
        layers = gated_layers(model)
        if not layers:
            raise ValueError(
                "RankDynaCallback found no RankDyna layer (SVDLinear, ChannelGatedLinear) in the model: call "
                "`rankdyna_trainer.prepare_model(model, config)` before building the Trainer."
            )
        config = self._config_of_model(model)
        refusal = _unsupported_backend(args)
        if refusal is not None:
            raise ValueError(refusal)
        if is_sharded(model):
            _check_sharded_run(config)
            shard_statistics_like_parameters(model)
        resumed = self._load_sharded_resume_state(args, state, model, **kwargs)
        self._names, self._layers = list(layers), list(layers.values())
        self.budget = ParameterBudget.from_fractions(
            dense_params=dense_params(self._layers),
            initial_fraction=config.initial_budget,
            target_fraction=config.target_budget,
            total_steps=state.max_steps,
            warmup_fraction=config.warmup_fraction,
            final_fraction=config.final_fraction,
            interval=1 if config.reallocation_interval == AUTO else config.reallocation_interval,
        )
        if config.reallocation_interval == AUTO:
            config = self._resolve_reallocation_interval(config)
        # Scores are first read at the first reallocation; averages started memory_steps before it are the same.
        self.budget = self.budget.scoring_from(memory_steps(config.beta1, config.beta2))
        self.config = config
        unwrap_model(model).rankdyna_config = config  # the config this run trains with, for its record and export
        self.scores = SingularGroupScores(self._layers, config.beta1, config.beta2,
                                          config.singular_value_signal, config.importance)
        if resumed:
            self.scores.skipped_steps = self._reported_skips = resumed["skipped_steps"]
            self._warned_zero = set(resumed["warned_zero"])
        self._group_costs = [l.group_cost for l in self._layers]
        self.scores.zero_gate_grads()
        self.kept_compute = KeptCompute(model, self._layers)  # gates as loaded (a resumed run's included)
        self._forget_best_before_target(args, state)  # a resumed state may name a checkpoint from before the target
        self._start_distillation(args, state, model)

    def _start_distillation(self, args, state, model) -> None:
        """Set up ``distillation_weight > 0``: the teacher is taken when pruning starts (:meth:`on_step_begin`), or,
        for a run resumed after that, read from the checkpoint it resumes from."""
        if self.distillation is not None:
            self.distillation.close()
        self.distillation = None
        if self.config.distillation_weight <= 0:
            return
        if is_sharded(model):
            raise ValueError("RankDynaConfig(distillation_weight>0) does not support sharded (FSDP) models: the "
                             "teacher would be a second sharded model; set distillation_weight=0.")
        if args.label_smoothing_factor > 0:
            raise ValueError(f"RankDynaConfig(distillation_weight>0) distils on the model's own loss; the Trainer's "
                             f"label smoothing (label_smoothing_factor={args.label_smoothing_factor}) replaces it: "
                             "set one of them to 0.")
        self.distillation = SelfDistillation(model, self.config.distillation_weight,
                                             self.config.distillation_temperature)
        self.distillation._is_regression()  # a multi-label head fails here, not when pruning starts
        if state.global_step > self.budget.warmup_steps:
            checkpoint = _resumed_checkpoint(args, state)
            if not os.path.isfile(os.path.join(checkpoint, TEACHER_FILE)):
                raise ValueError(
                    f"RankDyna resumes at step {state.global_step}, after its distillation teacher was taken (step "
                    f"{self.budget.warmup_steps}, when pruning started), but {checkpoint} holds no {TEACHER_FILE}: "
                    "the teacher cannot be rebuilt. Resume from a checkpoint of this run saved with distillation on, "
                    "or from one at or before that step.")
            self.distillation.load_teacher(checkpoint)

    def _load_sharded_resume_state(self, args, state, model, optimizer=None, lr_scheduler=None, **kwargs):
        # A resumed run starts with state.global_step > 0 (the Trainer loaded trainer_state.json and, through
        # shard_model's load hook, model.safetensors); the optimizer and scheduler exist by now, before any step.
        if not is_sharded(model) or state.global_step == 0:
            return None
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        return load_resume_state(checkpoint, model, optimizer, lr_scheduler, state.global_step)

    def _config_of_model(self, model) -> RankDynaConfig:
        """The callback's config, or prepare_model's, with the model-kind 'auto' fields as prepare_model resolved
        them (explicit values of the callback's config win)."""
        prepared = getattr(unwrap_model(model), "rankdyna_config", None)
        config = self.config or prepared
        if config is None:
            raise ValueError("RankDynaCallback needs a RankDynaConfig: pass it to the callback or to prepare_model.")
        if prepared is not None and config is not prepared:
            from_prepared = {name: getattr(prepared, name) for name in (*MODEL_KIND_FIELDS, "ffn_groups")
                             if getattr(config, name) == AUTO and getattr(prepared, name) != AUTO}
            if config.attention_groups != prepared.attention_groups:  # the layers prepare_model built decide
                from_prepared["attention_groups"] = prepared.attention_groups
            config = with_values(config, from_prepared, "The model-kind defaults prepare_model resolved")
        if auto_fields(config):  # a model prepared without a config of its own (not through prepare_model)
            config, _ = resolve_model_kind(config, model, has_calibration=True)
        return config

    def _resolve_reallocation_interval(self, config: RankDynaConfig) -> RankDynaConfig:
        """``reallocation_interval='auto'`` from the pruning phase's length in this run (``max_steps`` known)."""
        pruning_steps = self.budget.final_start - self.budget.warmup_steps
        interval = reallocation_interval_for(pruning_steps)
        self.budget = dataclasses.replace(self.budget, interval=interval)
        logger.info("RankDyna defaults for a run of %d optimizer steps: reallocation_interval=%d (%d pruning steps "
                    "// %d, within [1, %d]; docs/method.md#defaults).", self.budget.total_steps, interval,
                    pruning_steps, REALLOCATIONS_PER_PHASE, MAX_REALLOCATION_INTERVAL)
        return dataclasses.replace(config, reallocation_interval=interval)

    def _run_first_among_callbacks(self) -> None:
        # Reporting callbacks (W&B, TensorBoard) are registered before user callbacks, so values added to
        # `logs` in on_log would reach them only if this callback runs first.
        caller = inspect.currentframe().f_back.f_back
        handler = caller.f_locals.get("self") if caller is not None else None
        if isinstance(handler, CallbackHandler) and handler.callbacks and handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    # -- every optimizer step -------------------------------------------------------------------
    def scores_masked_groups(self, step: int) -> bool:
        """Whether optimizer step ``step`` runs every group (so masked groups get scored) or the kept ones only."""
        if not self.budget.tracks_scores(step):
            return False
        return self.config.masked_group_scoring == "every_step" or self.budget.is_reallocation_step(step)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.budget is not None:
            self.kept_compute.use_kept(not self.scores_masked_groups(state.global_step))
            self._score_gates(self.budget.tracks_scores(state.global_step))
        if self.distillation is not None and self.distillation.teacher is None \
                and state.global_step >= self.budget.warmup_steps:
            self.distillation.take_teacher()  # the dense, task-tuned model, before the first reallocation

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step
        if self.budget.tracks_scores(step):
            self._add_orthogonality_gradient()
            self._all_reduce_gate_grads()
            scored = None if self.scores_masked_groups(step) else [l.gate for l in self._layers]
            self.scores.update(grad_scale=_unscale_parameter_grads(optimizer), scored=scored)
        self.scores.zero_gate_grads()
        if self.budget.is_reallocation_step(step):
            self.reallocate(self.budget.params_at(step))

    def _score_gates(self, scored: bool) -> None:
        """Whether this step's forward gives the gates a gradient: a step whose scores nobody reads skips it (and
        the multiplies by ones around it; layer.gate_for_forward). A host-side flag per layer, no sync."""
        if self._layers and self._layers[0].gate_scored != scored:  # the flag changes twice a run
            for layer in self._layers:
                layer.gate_scored = scored

    @torch.no_grad()
    def reallocate(self, budget_params: int) -> None:
        scores = self.scores.group_scores()
        if self.config.rank_by == "score_per_param":
            torch._foreach_div_(scores, self._group_costs)
        costs = [(l.group_cost, l.full_cost) for l in self._layers]
        keep = allocate_by_cost(scores, costs, budget_params, min_rank=self.config.min_rank,
                                rank_multiple=self.config.rank_multiple)
        torch._foreach_copy_([l.gate for l in self._layers], [k.to(l.gate.dtype) for k, l in zip(keep, self._layers)])
        self._broadcast_gates()
        self.kept_compute.refresh()

    def _broadcast_gates(self) -> None:
        # Scores are identical on every process once gate gradients are averaged, so this changes nothing
        # in a correct run; it guarantees one allocation even if a process's scores drift (e.g. a custom
        # loss that differs per process), since DDP does not synchronise these buffers (see prepare_model).
        if not _is_distributed():
            return
        gates = [l.gate for l in self._layers]
        flat = torch.cat(gates)
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(gates, list(flat.split([g.numel() for g in gates])))

    def _add_orthogonality_gradient(self) -> None:
        if self.config.orth_reg_weight <= 0:
            return
        with torch.enable_grad():
            penalty = torch.stack([l.orthogonality_penalty() for l in self._layers if isinstance(l, SVDLinear)]).mean()
            (self.config.orth_reg_weight * penalty).backward()

    def _all_reduce_gate_grads(self) -> None:
        # Parameter gradients are averaged by DDP; the gate gradients are not parameters, so average them
        # here or processes would allocate differently.
        if not _is_distributed():
            return
        # Sharded 'sensitivity': the finiteness probe of this rank's factor shards rides on the same collective.
        grads = self.scores.gate_grads()
        probe = self.scores.local_factor_probe()
        flat = torch.cat(grads + ([probe.reshape(1)] if probe is not None else []))
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        torch._foreach_copy_(grads, list(flat[: flat.numel() - (probe is not None)].split([g.numel() for g in grads])))
        if probe is not None:
            self.scores.agree_on_factors(flat[-1])

    # -- reporting and files ----------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.budget is None or logs is None:
            return
        step = state.global_step
        ranks = layer_ranks(self._layers)  # the one host sync of this log step
        current = sum(min(r * l.group_cost, l.full_cost) for r, l in zip(ranks, self._layers))
        zero_matrices, zero_blocks = pruned_away(dict(zip(self._names, ranks)))
        values = {
            "rankdyna/budget_params": self.budget.params_at(step),
            "rankdyna/params": current,
            "rankdyna/params_fraction": current / self.budget.dense_params,
            "rankdyna/zero_rank_matrices": len(zero_matrices),
            "rankdyna/zero_rank_blocks": len(zero_blocks),
        }
        if self.distillation is not None:
            values.update(self.distillation.logged_values())
        self._warn_new_zero_ranks(zero_matrices, zero_blocks, step)
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)
        skipped = self.scores.skipped_steps
        if skipped > self._reported_skips:
            logger.warning(
                "RankDyna skipped %d optimizer step(s) with non-finite gradients when updating importance scores.",
                skipped - self._reported_skips,
            )
            self._reported_skips = skipped

    def _warn_new_zero_ranks(self, zero_matrices: list[str], zero_blocks: list[str], step: int) -> None:
        # A rank-0 matrix outputs only its bias; a block whose every matrix is at rank 0 (e.g. a layer's query, key
        # and value) is cut out of the network. Both can be right for a budget, but never silently.
        new_matrices = [n for n in zero_matrices if n not in self._warned_zero]
        new_blocks = [n for n in zero_blocks if n not in self._warned_zero]
        if new_blocks:
            logger.warning("RankDyna step %d: every targeted matrix of %s is at rank 0 (the block is pruned away): %s",
                           step, "these blocks" if len(new_blocks) > 1 else "this block", ", ".join(new_blocks))
        if new_matrices:
            logger.warning("RankDyna step %d: %d matrix(es) pruned to rank 0 (output = bias only): %s", step,
                           len(new_matrices), ", ".join(new_matrices))
        self._warned_zero.update(new_matrices + new_blocks)

    def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if is_sharded(model) and self.sharded_checkpoint is not None:
            extra = {"skipped_steps": self.scores.skipped_steps, "warned_zero": sorted(self._warned_zero)}
            save_resume_state(checkpoint, model, optimizer, lr_scheduler, args, self.sharded_checkpoint, extra)
        if self.distillation is not None and self.distillation.teacher is not None and state.is_world_process_zero:
            self.distillation.save_teacher(checkpoint)
        self._write_rank_pattern(model, checkpoint, state)  # last: its presence marks a complete checkpoint
        if self._forget_best_before_target(args, state) and state.is_world_process_zero:
            from transformers.trainer import TRAINER_STATE_NAME

            # The Trainer wrote trainer_state.json before this hook: rewrite it so a resumed run agrees.
            state.save_to_json(os.path.join(checkpoint, TRAINER_STATE_NAME))

    # -- the best checkpoint ----------------------------------------------------------------------
    def on_evaluate(self, args, state, control, **kwargs):
        # Runs inside `Trainer.evaluate`, before the Trainer compares this evaluation with the best so far: an
        # evaluation at the target then competes only with other evaluations at the target.
        self._forget_best_before_target(args, state)

    def _at_target(self, step: int) -> bool:
        """Whether the model after ``step`` optimizer steps holds the final allocation: the last one is made on the
        optimizer step that starts at ``global_step == final_start``, so a checkpoint at ``final_start + 1`` or later
        has it."""
        return step > self.budget.final_start

    def _forget_best_before_target(self, args, state) -> bool:
        """Drop a "best" evaluation or checkpoint from before the target budget, so that
        ``load_best_model_at_end`` can only reload a model at the target (never a denser one). Returns whether
        anything was dropped."""
        if self.budget is None or state.best_global_step is None or self._at_target(state.best_global_step):
            return False
        logger.info("RankDyna: the best %s so far (step %d) is from before the target budget (reached after step "
                    "%d); only evaluations at the target can be the best model.", args.metric_for_best_model,
                    state.best_global_step, self.budget.final_start)
        state.best_metric = state.best_global_step = state.best_model_checkpoint = None
        return True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.budget is not None:
            self.kept_compute.clear()  # the gates are the user's from here (and load_best_model_at_end's)
            self._score_gates(True)
        if self.distillation is not None:
            self.distillation.close()  # the model's forward and loss are the user's again; the teacher is freed
        if self._layers:
            final_ranks = dict(zip(self._names, layer_ranks(self._layers)))
            self._warn_new_zero_ranks(*pruned_away(final_ranks), state.global_step)
            self._warn_if_over_target(args, state)
        self._write_rank_pattern(model, args.output_dir, state)

    def _warn_if_over_target(self, args, state) -> None:
        """Say loudly when the model the Trainer ends with keeps more than the target budget (exporting it would give
        a model larger than asked for)."""
        kept = kept_params(self._layers)
        target = self.budget.params_at(self.budget.total_steps)
        if kept <= target:
            return
        reloaded = (f" The Trainer reloaded {state.best_model_checkpoint} (load_best_model_at_end=True): that "
                    "checkpoint holds an allocation from before the target.") if (
            args.load_best_model_at_end and state.best_model_checkpoint) else ""
        logger.warning(
            "RankDyna: the model at the end of training keeps %d of %d targeted parameters (%.1f %%), above the target "
            "budget of %d (%.1f %%); export_model would save a model larger than the target.%s", kept,
            self.budget.dense_params, 100 * kept / self.budget.dense_params, target,
            100 * target / self.budget.dense_params, reloaded)

    def _write_rank_pattern(self, model, directory: str, state) -> None:
        if not state.is_world_process_zero:
            return
        os.makedirs(directory, exist_ok=True)
        pattern = {
            "step": state.global_step,
            "budget_params": self.budget.params_at(state.global_step),
            "params": kept_params(self._layers),
            "dense_params": self.budget.dense_params,
            "ranks": rank_pattern(model),
        }
        with open(os.path.join(directory, RANK_PATTERN_FILE), "w") as f:
            json.dump(pattern, f, indent=2)


FSDP_ROUTE = ("load the model unsharded, prepare_model(model, config), then shard_model(model, "
              "DistributedConfig(fsdp_size=N)) from rankdyna_trainer.methods.rankdyna, under torchrun "
              "(docs/reliability.md)")


def _unsupported_backend(args) -> str | None:
    """Why RankDyna refuses the run's DeepSpeed or accelerate-FSDP setting (TrainingArguments or an
    ``accelerate launch`` config), or None."""
    def launched_with(name: str) -> bool:
        return os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() in ("1", "true")

    if getattr(args, "deepspeed", None) or launched_with("DEEPSPEED"):
        return ("RankDyna does not support DeepSpeed: under DeepSpeed, accelerate runs engine.step() inside "
                "accelerator.backward, so the gradients RankDyna scores are gone (and with ZeRO sharded) before any "
                "Trainer callback runs; a hook on the engine step would be needed, and it could not be run here (no "
                "GPU, DeepSpeed not installed). Use DDP (torchrun / accelerate launch --multi_gpu) or FSDP2: "
                + FSDP_ROUTE + ".")
    if getattr(args, "fsdp", None) or launched_with("FSDP"):
        if _fsdp_version(args) != "2":
            return ("RankDyna does not support FSDP1 (TrainingArguments(fsdp=...) / an accelerate FSDP config "
                    "without fsdp_version 2): FSDP1 flattens each wrapped block's parameters and gradients into one "
                    "buffer split across ranks, so no rank holds a factor's gradient as a tensor of its own, and it "
                    "was never run with RankDyna. Use FSDP2: " + FSDP_ROUTE + ".")
        return ("RankDyna does not take FSDP2 through TrainingArguments(fsdp=..., fsdp_config={'fsdp_version': 2}) "
                "or accelerate launch: accelerate's own FSDP2 wrapping, saving and checkpointing only run on a GPU "
                "and were never run with RankDyna (on the CPU accelerate silently falls back to DDP). The sharded "
                "path that is tested: " + FSDP_ROUTE + ".")
    return None


def _fsdp_version(args) -> str:
    # TrainingArguments stores fsdp_config={"fsdp_version": 2} as fsdp_config["version"] (and in fsdp_plugin_args);
    # accelerate launch sets FSDP_VERSION.
    config = getattr(args, "fsdp_config", None) or {}
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    return str(config.get("version") or config.get("fsdp_version") or plugin.get("fsdp_version")
               or os.environ.get("FSDP_VERSION") or 1)


def _check_sharded_run(config: RankDynaConfig) -> None:
    """Refuse settings whose math was not written for DTensor shards."""
    if config.orth_reg_weight > 0:
        raise ValueError(f"orth_reg_weight={config.orth_reg_weight} is not supported on a sharded (FSDP2) model: the "
                         "orthogonality penalty multiplies whole factors, which FSDP shards; set orth_reg_weight=0.")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _unscale_parameter_grads(optimizer) -> torch.Tensor | float:
    """Unscale fp16 parameter gradients (if gradient clipping has not already) and return the loss scale.

    With fp16, accelerate unscales parameter gradients inside ``clip_grad_norm_`` (only when
    ``max_grad_norm > 0``) or else inside ``optimizer.step``, which runs after this callback. Unscaling here
    (the scaler then skips it in ``step``) gives the scores the same gradients either way. The gate
    gradients are not parameters, so the caller divides them by the returned scale.
    """
    scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer.scaler (a GradScaler)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    try:
        scaler.unscale_(optimizer.optimizer)
    except RuntimeError:
        pass  # "unscale_() has already been called on this optimizer since the last update()"
    return scaler.get_scale()


def _resumed_checkpoint(args, state) -> str:
    """The folder ``Trainer.train(resume_from_checkpoint=...)`` resumes from. Callbacks are not told it, so it is read
    from the Trainer's training loop up the stack; ``output_dir/checkpoint-<global_step>`` (the Trainer's own naming)
    if that loop is not found."""
    from transformers import Trainer

    frame = inspect.currentframe()
    while frame is not None:
        local = frame.f_locals
        if isinstance(local.get("self"), Trainer) and isinstance(local.get("resume_from_checkpoint"), str):
            return local["resume_from_checkpoint"]
        frame = frame.f_back
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
