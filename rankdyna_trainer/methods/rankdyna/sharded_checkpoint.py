"""What a Trainer checkpoint of a sharded (FSDP2) run lacks, so that it resumes exactly.

For a model sharded at load time (``from_pretrained(distributed_config=...)`` or :func:`shard_model`) the Trainer
(transformers 5.24) refuses to checkpoint the optimizer: ``Trainer.__init__`` raises "Resuming is not supported for
models sharded at load time" unless ``save_only_model=True``, and with it ``_save_checkpoint`` writes only the
gathered ``model.safetensors`` and ``trainer_state.json`` (no optimizer, scheduler or RNG files).
:class:`RankDynaCallback` writes the rest into the same ``checkpoint-N`` in ``on_save`` and loads it back in
``on_train_begin`` of ``trainer.train(resume_from_checkpoint=...)``:

* ``"sharded"``: model and optimizer with ``torch.distributed.checkpoint`` (DCP), each rank writing its own shards
  into ``rankdyna_dcp/``;
* ``"full"``: the optimizer gathered on rank 0 into one file (``rankdyna_optimizer.pt``), loaded on rank 0 and
  broadcast; the model comes from the Trainer's own ``model.safetensors``.

Both add the learning-rate scheduler (``rankdyna_scheduler.pt``), each rank's RNG state in the Trainer's own format
(``rng_state_{rank}.pth``, which ``Trainer._load_rng_state`` restores after skipping the trained batches) and
``rankdyna_resume.json``, written last. RankDyna's own state (gates, Fisher and sensitivity statistics) lives in
model buffers, so it travels with the model; the kept-group indices are recomputed from the gates.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist

STATE_DICT_TYPES = ("sharded", "full")
RESUME_FILE = "rankdyna_resume.json"
DCP_FOLDER = "rankdyna_dcp"
FULL_OPTIMIZER_FILE = "rankdyna_optimizer.pt"
SCHEDULER_FILE = "rankdyna_scheduler.pt"


def check_state_dict_type(state_dict_type) -> None:
    if state_dict_type is not None and state_dict_type not in STATE_DICT_TYPES:
        raise ValueError(f"sharded_checkpoint must be one of {STATE_DICT_TYPES} or None (no resume state), "
                         f"got {state_dict_type!r}.")


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer wraps the torch optimizer; DCP must see (and may step) the plain one.
    return getattr(optimizer, "optimizer", optimizer)


def save_resume_state(checkpoint: str, model, optimizer, lr_scheduler, args, state_dict_type: str,
                      extra: dict) -> None:
    """Every rank calls this (the optimizer state is gathered or written collectively)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, get_state_dict

    os.makedirs(checkpoint, exist_ok=True)
    _save_rng_state(checkpoint, args)
    optimizer = _torch_optimizer(optimizer)
    if state_dict_type == "sharded":
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=os.path.join(checkpoint, DCP_FOLDER))
    else:
        full = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            torch.save(full, os.path.join(checkpoint, FULL_OPTIMIZER_FILE))
    dist.barrier()  # every rank's files are written before the marker says the state is complete
    if dist.get_rank() == 0:
        torch.save(lr_scheduler.state_dict(), os.path.join(checkpoint, SCHEDULER_FILE))
        marker = {"state_dict_type": state_dict_type, "world_size": dist.get_world_size(), **extra}
        with open(os.path.join(checkpoint, RESUME_FILE), "w") as f:
            json.dump(marker, f, indent=2)


def load_resume_state(checkpoint: str, model, optimizer, lr_scheduler, step: int) -> dict:
    """Restore what :func:`save_resume_state` wrote (every rank calls it); returns the ``extra`` dict it was given."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_optimizer_state_dict,
        set_state_dict,
    )

    marker_file = os.path.join(checkpoint, RESUME_FILE)
    if not os.path.isfile(marker_file):
        raise ValueError(
            f"Resuming a sharded (FSDP2) run at step {step}, but {checkpoint} holds no RankDyna resume state "
            f"({RESUME_FILE}). The Trainer checkpoints only the model of a sharded run (save_only_model=True), so the "
            "optimizer, the learning-rate schedule and the RNG would start fresh. RankDynaCallback(config, "
            "sharded_checkpoint='sharded' or 'full') writes them into each checkpoint-N of args.output_dir; resume "
            "from one of those (trainer.train(resume_from_checkpoint=True) or that folder).")
    with open(marker_file) as f:
        marker = json.load(f)
    if marker["world_size"] != dist.get_world_size():
        raise ValueError(f"{checkpoint} was written by {marker['world_size']} processes and is resumed with "
                         f"{dist.get_world_size()}: resuming a sharded RankDyna run on another number of processes "
                         "was never run; resume with the same number.")
    optimizer = _torch_optimizer(optimizer)
    if marker["state_dict_type"] == "sharded":
        import torch.distributed.checkpoint as dcp

        model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards, filled in place
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, DCP_FOLDER))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        full = (torch.load(os.path.join(checkpoint, FULL_OPTIMIZER_FILE), map_location="cpu", weights_only=True)
                if dist.get_rank() == 0 else {})
        set_optimizer_state_dict(model, optimizer, full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE), weights_only=True))
    return {k: v for k, v in marker.items() if k not in ("state_dict_type", "world_size")}


def _save_rng_state(checkpoint: str, args) -> None:
    # The Trainer's own format and file name (Trainer._save_rng_state), so that its _load_rng_state restores them at
    # the right moment of the resumed epoch. Other accelerators' generators (XLA, NPU, ...) are not saved.
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    torch.save(states, os.path.join(checkpoint, f"rng_state_{args.process_index}.pth"))
