"""Finding a checkpoint that is safe to resume a RankDyna run from."""

from __future__ import annotations

import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .methods.rankdyna.callback import RANK_PATTERN_FILE

TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that a save finished writing, or None.

    The Trainer writes a checkpoint in place, so a crash during a save leaves a partial folder, and
    ``transformers.trainer_utils.get_last_checkpoint`` (what ``resume_from_checkpoint=True`` uses) returns it
    anyway. ``trainer_state.json`` is the Trainer's last file and ``rank_pattern.json`` is written after it
    by RankDynaCallback's ``on_save`` (after the distillation teacher, when there is one), so a folder holding both
    is complete.
    """
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"output_dir {output_dir!r} does not exist.")
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        folder = os.path.join(output_dir, name)
        if match and all(os.path.isfile(os.path.join(folder, f)) for f in (TRAINER_STATE_FILE, RANK_PATTERN_FILE)):
            steps.append(int(match.group(1)))
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{max(steps)}") if steps else None
