"""Resume check with numbers: interrupt a 20-step tiny-BERT RankDyna run right after a checkpoint, resume it
in a fresh Trainer, and compare with the uninterrupted run (same seed).

    PYTHONPATH=. python scripts/reliability_resume.py [--crash-steps 6 10 17] [--out /tmp/rankdyna_resume]

Prints, per resume point, whether every later rank pattern equals the uninterrupted one and the largest
absolute difference over all weights and importance buffers. Tests in tests/reliability/test_resume.py.
"""

import argparse
import shutil
from pathlib import Path

from transformers.trainer_callback import PrinterCallback

from tests.reliability.helpers import build_trainer as _build_trainer
from tests.reliability.helpers import state_of
from tests.reliability.test_resume import CrashAfterSave, RecordAllocations


def build_trainer(*args, **kwargs):
    trainer = _build_trainer(*args, **kwargs)
    trainer.remove_callback(PrinterCallback)  # keep stdout to the table
    return trainer


parser = argparse.ArgumentParser()
parser.add_argument("--crash-steps", type=int, nargs="+", default=[6, 10, 17])
parser.add_argument("--out", default="/tmp/rankdyna_resume")
args = parser.parse_args()
out = Path(args.out)
shutil.rmtree(out, ignore_errors=True)

full_history = RecordAllocations()
full = build_trainer(out / "full", callbacks=[full_history])
full.train()
full_state = state_of(full.model)

print("| resume after step | rank patterns equal at every later step | max abs diff (weights) "
      "| max abs diff (importance buffers) |")
print("|---|---|---|---|")
for step in args.crash_steps:
    run_dir = out / f"crash{step}"
    try:
        build_trainer(run_dir, callbacks=[CrashAfterSave(step)], save_strategy="steps", save_steps=step).train()
    except KeyboardInterrupt:
        pass
    history = RecordAllocations()
    resumed = build_trainer(run_dir, callbacks=[history])
    resumed.train(resume_from_checkpoint=str(run_dir / f"checkpoint-{step}"))
    same = all(history.history[s] == full_history.history[s] for s in history.history)
    state = state_of(resumed.model)
    buffers = [k for k in state if "sensitivity" in k or "uncertainty" in k]
    weights = [k for k in state if k not in buffers]
    diff = lambda keys: max(float((state[k].float() - full_state[k].float()).abs().max()) for k in keys)  # noqa: E731
    print(f"| {step} | {same} | {diff(weights):.3g} | {diff(buffers):.3g} |")
