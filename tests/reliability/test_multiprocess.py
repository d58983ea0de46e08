"""Two processes (torchrun, gloo on CPU): one allocation everywhere, one model, one writer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankdyna_trainer.methods.rankdyna import RANK_PATTERN_FILE
from rankdyna_trainer.methods.rankdyna.distillation import TEACHER_FILE

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    if shutil.which("torchrun") is None and not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
           "WANDB_DIR": str(out), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def _load(path: Path):
    return json.loads(path.read_text())


def test_allocation_is_identical_on_every_process_at_every_reallocation(two_process_run):
    dumps = two_process_run / "dumps"
    rank0, rank1 = _load(dumps / "allocations_rank0.json"), _load(dumps / "allocations_rank1.json")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1]
    assert [r["step"] for r in rank0] == [2, 4, 6, 8, 10, 12, 14, 16]
    for a, b in zip(rank0, rank1):
        assert a["gates"] == b["gates"], f"masks differ at step {a['step']}"
        # The scores themselves agree (not only the masks that rank 0 broadcasts): the processes saw
        # different data, so this holds only because the gate gradients were averaged.
        for sa, sb in zip(a["scores"], b["scores"]):
            torch.testing.assert_close(torch.tensor(sa), torch.tensor(sb), rtol=1e-5, atol=1e-12)
    kept = [sum(map(sum, r["gates"])) for r in rank0]
    assert kept[-1] < kept[0], "the run should have pruned"


def test_gate_grad_is_not_overwritten_between_micro_batches(two_process_run):
    # The worker syncs every micro-batch (sync_each_batch), so with DDP's default broadcast_buffers=True
    # process 0's partial gate_grad would replace the local one at the second micro-batch's forward
    # (observed before prepare_model kept RankDyna's buffers out of DDP's broadcast).
    for rank in (0, 1):
        record = _load(two_process_run / "dumps" / f"microbatches_rank{rank}.json")
        after_first, at_second = record["after_backward"], record["at_forward"][1::2]
        assert len(after_first) == 20 and len(at_second) == 20
        assert any(any(v != 0 for v in g) for g in after_first)
        assert at_second == after_first, f"gate_grad changed between micro-batches on process {rank}"


def test_final_model_equals_what_process_0_saved(two_process_run):
    saved = load_file(two_process_run / "trainer_rank0" / "model.safetensors")
    for rank in (0, 1):
        final = load_file(two_process_run / "dumps" / f"final_rank{rank}.safetensors")
        persistent = {k: v for k, v in final.items() if not k.endswith("gate_grad")}
        assert saved.keys() <= persistent.keys()
        for key, value in saved.items():
            torch.testing.assert_close(persistent[key], value, rtol=0, atol=0, msg=lambda m: f"{rank} {key}: {m}")
    pattern = _load(two_process_run / "trainer_rank0" / RANK_PATTERN_FILE)
    gates = {k[: -len(".gate")]: int(v.sum()) for k, v in saved.items() if k.endswith(".gate")}
    assert pattern["ranks"] == gates


def test_only_process_0_writes_files(two_process_run):
    rank0 = {p.relative_to(two_process_run / "trainer_rank0").as_posix()
             for p in (two_process_run / "trainer_rank0").rglob("*") if p.is_file()}
    assert {"model.safetensors", RANK_PATTERN_FILE, "checkpoint-10/rank_pattern.json",
            "checkpoint-20/model.safetensors", f"checkpoint-10/{TEACHER_FILE}",
            f"checkpoint-20/{TEACHER_FILE}"} <= rank0
    rank1_dir = two_process_run / "trainer_rank1"
    rank1 = [p.relative_to(rank1_dir).as_posix() for p in rank1_dir.rglob("*") if p.is_file()]
    # The Trainer saves every process's RNG state into the checkpoint (needed to resume); nothing else.
    assert sorted(rank1) == ["checkpoint-10/rng_state_1.pth", "checkpoint-20/rng_state_1.pth"]
