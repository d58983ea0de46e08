"""FSDP2 over two processes (torchrun, gloo on CPU, the real Trainer): one allocation on every rank, the same as a
single process on the same global batch, an exported model that reloads to the same logits, and a checkpoint
that resumes exactly in a fresh torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankdyna_trainer.methods.rankdyna import RANK_PATTERN_FILE, export_model
from rankdyna_trainer.methods.rankdyna.sharded_checkpoint import (
    DCP_FOLDER,
    FULL_OPTIMIZER_FILE,
    RESUME_FILE,
    SCHEDULER_FILE,
)
from rankdyna_trainer.methods.rankdyna.sharding import ELEMENT_STATISTICS
from tests.tiny_models import ARCHITECTURES, example_inputs

from .fsdp_worker import CASES, GLOBAL_BATCH, RESUME_AT, STATE_DICT_TYPES, STEPS, load_prepared, save_base_model, train

# Two torchruns (the runs, then the resumes) and the single-process reference: 2-2.5 min on the shared 2 cores.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(out: Path, *mode: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
           "WANDB_DIR": str(out), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out), *mode]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("fsdp")
    for case in CASES:
        save_base_model(case, out / case / "base")
    _torchrun(out)
    return out


@pytest.fixture(scope="module")
def resumed_run(fsdp_run):
    """Each case resumed in a fresh torchrun from a copy of the step-5 checkpoint (so nothing but the checkpoint
    folder carries over), trained to the end."""
    for case in CASES:
        shutil.copytree(fsdp_run / case / "trainer" / f"checkpoint-{RESUME_AT}",
                        fsdp_run / case / "resumed" / f"checkpoint-{RESUME_AT}")
    _torchrun(fsdp_run, "resume")
    return fsdp_run


@pytest.fixture(scope="module")
def single_process(fsdp_run):
    """The same runs in this (unsharded) process, with the 2 x 2 examples of a sharded step as one batch of 4."""
    runs = {}
    for case, (arch, _, _) in CASES.items():
        model = load_prepared(case, fsdp_run / case / "base")
        dump, _ = train(case, model, fsdp_run / case / "single", per_device_batch=GLOBAL_BATCH)
        model.eval()
        export_model(model)
        with torch.no_grad():
            logits = model(**example_inputs(ARCHITECTURES[arch].task)).logits
        runs[case] = {"records": dump.records, "exported_logits": logits}
    return runs


def _load(path: Path):
    return json.loads(path.read_text())


def _allocations(folder: Path, rank: int, prefix: str = "") -> list[dict]:
    return _load(folder / f"{prefix}allocations_rank{rank}.json")["allocations"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_and_scores_are_identical_on_both_ranks(fsdp_run, case):
    rank0, rank1 = (_allocations(fsdp_run / case, r) for r in (0, 1))
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [2, 4, 6, 8]
    for a, b in zip(rank0, rank1):
        assert a["gates"] == b["gates"], f"masks differ at step {a['step']}"
        # The scores agree before the mask broadcast could hide a difference: each rank saw half the batch (and,
        # for 'sensitivity', only its shards of U and V).
        for sa, sb in zip(a["scores"], b["scores"]):
            torch.testing.assert_close(torch.tensor(sa), torch.tensor(sb), rtol=1e-6, atol=0)
    kept = [sum(map(sum, r["gates"])) for r in rank0]
    assert kept[-1] < kept[0], "the run should have pruned"


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_run_allocates_like_a_single_process_on_the_global_batch(fsdp_run, single_process, case):
    sharded, single = _allocations(fsdp_run / case, 0), single_process[case]["records"]
    assert [r["step"] for r in sharded] == [r["step"] for r in single]
    for a, b in zip(sharded, single):
        assert a["gates"] == b["gates"], f"masks differ from the single process at step {a['step']}"
        for sa, sb in zip(a["scores"], b["scores"]):
            # Float tolerance of the reductions (FSDP's reduce-scatter, the gate all-reduce, sums of shards);
            # measured ~1e-6 relative (llama/fisher) and ~8e-6 (bert/sensitivity).
            torch.testing.assert_close(torch.tensor(sa), torch.tensor(sb), rtol=1e-4,
                                       atol=1e-4 * max(map(abs, sb)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_statistics_and_frozen_groups_are_sharded(fsdp_run, case):
    for rank in (0, 1):
        layout = _load(fsdp_run / case / f"layout_rank{rank}.json")
        assert layout["plain_parameters"] == []  # every parameter (U, s, V, frozen factors, the rest) is a DTensor
        # A tied output layer uses the (sharded) embedding weight after shard_model, as after from_pretrained.
        tied = ARCHITECTURES[CASES[case][0]].config_kwargs.get("tie_word_embeddings", False)
        assert layout["tied_embeddings"] == tied
        assert layout["frozen_factors"] and layout["frozen_factors_sharded"]  # factor_budget=1.0 freezes groups
        if CASES[case][1]["importance"] == "sensitivity":
            assert layout["sharded_buffers"] and all(n.rsplit(".", 1)[1] in ELEMENT_STATISTICS
                                                     for n in layout["sharded_buffers"])
        # Each rank holds about half of the elements (the replicated gates and small buffers aside).
        assert layout["local_elements"] < 0.6 * layout["global_elements"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_budget_is_met(fsdp_run, case):
    pattern = _load(fsdp_run / case / "trainer" / RANK_PATTERN_FILE)
    assert pattern["params"] <= pattern["budget_params"]
    assert pattern["params"] < 0.5 * pattern["dense_params"]  # target_budget 0.4


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_rankdyna_collective_per_step(fsdp_run, case):
    # Counted in RankDynaCallback.on_pre_optimizer_step. Every scored step: one all-reduce (the gate gradients,
    # and for 'sensitivity' the finiteness of the factor shards). A reallocation step adds one all-reduce of the
    # per-group sums of the shards ('sensitivity' only) and one broadcast of the masks: never one collective per
    # matrix (the models have 14 gated layers).
    reallocations = {r["step"] for r in _allocations(fsdp_run / case, 0)}
    for rank in (0, 1):
        steps = _load(fsdp_run / case / f"collectives_rank{rank}.json")
        assert len(steps) == 10 and sum(s["scored"] for s in steps) >= 6
        for counts in steps:
            step, scored = counts.pop("step"), counts.pop("scored")
            realloc = step in reallocations
            sensitivity = CASES[case][1]["importance"] == "sensitivity"
            all_reduces = scored + (realloc and sensitivity)  # no scoring in the final phase (frozen pattern)
            expected = ({"all_reduce": all_reduces} if all_reduces else {}) | ({"broadcast": 1} if realloc else {})
            assert counts == expected, f"rank {rank} step {step}: {counts}"


@pytest.fixture(scope="module")
def reloaded_logits(fsdp_run):
    """Each exported folder loaded by from_pretrained in one fresh process (no RankDyna layer, no sharding)."""
    code = (
        "import sys, torch, rankdyna_trainer, transformers\n"
        "from tests.tiny_models import example_inputs\n"
        "for folder, auto_class, task in zip(*[iter(sys.argv[1:])] * 3):\n"
        "    model = getattr(transformers, auto_class).from_pretrained(folder).eval()\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(**example_inputs(task)).logits, folder + '/reloaded_logits.pt')\n"
    )
    argv = [str(item) for case, (arch, _, _) in CASES.items()
            for item in (fsdp_run / case / "exported", ARCHITECTURES[arch].auto_class, ARCHITECTURES[arch].task)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: torch.load(fsdp_run / case / "exported" / "reloaded_logits.pt") for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_model_reloads_in_a_fresh_process_with_the_same_logits(fsdp_run, single_process, reloaded_logits,
                                                                         case):
    logits = torch.load(fsdp_run / case / "gathered_logits.pt")
    # Export changes nothing the model computes (masked groups were already zero).
    torch.testing.assert_close(logits["exported"], logits["gathered"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reloaded_logits[case], logits["exported"], rtol=1e-5, atol=1e-6)
    # And what an unsharded run on the same global batches exports.
    torch.testing.assert_close(reloaded_logits[case], single_process[case]["exported_logits"], rtol=1e-3, atol=1e-4)


def test_sharded_models_are_refused_where_the_math_needs_whole_tensors(fsdp_run):
    for rank in (0, 1):
        refusals = _load(fsdp_run / f"refusals_rank{rank}.json")
        assert refusals["prepare_model_on_a_sharded_model"].startswith(
            "prepare_model got a model whose parameters are already sharded")
        assert "shard_model(model, DistributedConfig(fsdp_size=N))" in refusals["prepare_model_on_a_sharded_model"]
        assert refusals["orth_reg_on_a_sharded_model"].startswith(
            "orth_reg_weight=0.1 is not supported on a sharded (FSDP2) model")
        # transformers' own refusal, the reason RankDynaCallback writes the optimizer state of a sharded run itself.
        assert refusals["trainer_checkpoint_of_a_sharded_model"].startswith(
            "Resuming is not supported for models sharded at load time")


def test_shard_model_refuses_what_it_cannot_shard_before_any_collective():
    from transformers.distributed import DistributedConfig

    from rankdyna_trainer.methods.rankdyna import RankDynaConfig, prepare_model, shard_model

    with pytest.raises(ValueError, match="shard_model expects a model passed through prepare_model"):
        shard_model(ARCHITECTURES["llama"].build(), DistributedConfig(fsdp_size=2))
    with pytest.raises(ValueError, match="RankDyna's sharded path is FSDP2 data parallelism only"):
        shard_model(prepare_model(ARCHITECTURES["llama"].build(), RankDynaConfig()),
                    DistributedConfig(fsdp_size=2, tp_size=2))
    tied = prepare_model(ARCHITECTURES["llama-tied"].build(), RankDynaConfig())
    tied.all_tied_weights_keys = {}  # a tie that transformers does not know of could not be restored
    with pytest.raises(ValueError, match="transformers lists no tied weights for it"):
        shard_model(tied, DistributedConfig(fsdp_size=2))


# -- resuming a sharded run ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_holds_what_the_trainer_leaves_out(fsdp_run, case):
    checkpoint = fsdp_run / case / "trainer" / f"checkpoint-{RESUME_AT}"
    files = {p.name for p in checkpoint.iterdir()}
    # The Trainer's own part under save_only_model=True: the gathered model and its state, no optimizer files.
    assert {"model.safetensors", "trainer_state.json"} <= files and not {"optimizer.pt", "scheduler.pt"} & files
    # RankDyna's part: optimizer (rank-local DCP shards, or gathered on rank 0), scheduler, each rank's RNG.
    assert {RESUME_FILE, SCHEDULER_FILE, "rng_state_0.pth", "rng_state_1.pth", RANK_PATTERN_FILE} <= files
    if STATE_DICT_TYPES[case] == "sharded":
        # DCP: one file of shards per rank, and the metadata that maps them to the global tensors.
        assert {p.name for p in (checkpoint / DCP_FOLDER).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        assert FULL_OPTIMIZER_FILE not in files
    else:
        assert FULL_OPTIMIZER_FILE in files and DCP_FOLDER not in files
    marker = _load(checkpoint / RESUME_FILE)
    # The callback's own counters travel too (the matrices already warned about as pruned to rank 0 are not warned
    # about again after the resume).
    assert marker == {"state_dict_type": STATE_DICT_TYPES[case], "world_size": 2, "skipped_steps": 0,
                      "warned_zero": marker["warned_zero"]}
    assert all(name in _load(checkpoint / RANK_PATTERN_FILE)["ranks"] for name in marker["warned_zero"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(resumed_run, case):
    folder = resumed_run / case
    final, resumed = (torch.load(folder / f"{p}final_state.pt") for p in ("", "resumed_"))
    assert set(final) == set(resumed)
    # Every parameter and buffer: factors, frozen factors, gates, Fisher / sensitivity statistics.
    unequal = [name for name in final if not torch.equal(final[name], resumed[name])]
    assert unequal == []
    if CASES[case][1]["importance"] == "sensitivity":
        assert any(name.endswith("sensitivity_U") for name in final)
    for rank in (0, 1):
        whole, rest = (_load(folder / f"{p}allocations_rank{rank}.json") for p in ("", "resumed_"))
        # Bit-identical: the same kernels on the same values (both runs are 2 processes on this machine).
        assert list(rest["losses"]) == [str(s) for s in range(RESUME_AT + 1, STEPS + 1)]
        assert rest["losses"] == {step: whole["losses"][step] for step in rest["losses"]}
        steps = [r["step"] for r in rest["allocations"]]
        assert steps == [6, 8]  # the reallocations after the resume point
        assert rest["allocations"] == [r for r in whole["allocations"] if r["step"] in steps]
        # Python's and torch's generators continue where they were (the Trainer restores the files RankDyna wrote).
        assert list(rest["rng"]) == [str(s) for s in range(RESUME_AT, STEPS)]
        assert rest["rng"] == {step: whole["rng"][step] for step in rest["rng"]}
    assert _load(folder / "resumed" / RANK_PATTERN_FILE) == _load(folder / "trainer" / RANK_PATTERN_FILE)


def test_resuming_on_another_number_of_processes_is_refused(resumed_run):
    for rank in (0, 1):
        message = _load(resumed_run / f"resume_refusals_rank{rank}.json")["other_world_size"]
        assert "was written by 3 processes and is resumed with 2" in message


def test_resuming_without_the_resume_state_is_refused(tmp_path):
    from rankdyna_trainer.methods.rankdyna.sharded_checkpoint import load_resume_state

    with pytest.raises(ValueError, match=f"holds no RankDyna resume state \\({RESUME_FILE}\\)"):
        load_resume_state(str(tmp_path), model=None, optimizer=None, lr_scheduler=None, step=5)
