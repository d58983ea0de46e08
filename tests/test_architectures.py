"""Any Hugging Face model in, a Hugging Face model out: RankDyna on tiny random configs of 15 architectures.

For each one: default targets from the block structure, 4 real Trainer steps with RankDynaCallback, export,
``save_pretrained``, then ``AutoModelFor....from_pretrained`` in a fresh interpreter (one for all folders) that must
reproduce the in-memory model's outputs, and the exported size within the budget.
"""

from __future__ import annotations

import traceback

import pytest

from rankdyna_trainer import RankDynaCallback, RankDynaConfig, export_model, prepare_model
from rankdyna_trainer.targets import find_target_linears

from .round_trip import exported_total, reload_in_fresh_process, save_for_reload, single_thread, train_steps
from .tiny_models import ARCHITECTURES

# Linear/Conv1D layers per block times blocks, counted from each architecture's modeling code.
EXPECTED_TARGETS = {
    "bert": 12, "roberta": 12, "distilbert": 12,
    "albert": 6,  # one shared layer group, applied num_hidden_layers times
    "deberta-v2": 16,  # q, k, v, the two relative-position projections, attention out, FFN in/out
    "gpt2": 8, "gpt-neox": 8, "phi3": 8,  # fused qkv / gate_up projections
    "llama": 14, "llama-tied": 14, "mistral": 14, "qwen2": 14, "vit": 12,
    "t5": 32, "bart": 32,  # encoder self-attention + FFN, decoder self- and cross-attention + FFN
}
BUDGET = 0.5


def _compress_train_save(arch: str, tmp_path) -> dict:
    spec = ARCHITECTURES[arch]
    model = spec.build()
    targets = find_target_linears(model)
    dense = sum(layer.weight.numel() for layer in targets.values())
    config = RankDynaConfig(target_budget=BUDGET, warmup_fraction=0.25, final_fraction=0.25, reallocation_interval=1)
    prepare_model(model, config)
    train_steps(model, spec.task, tmp_path / arch / "run", callbacks=[RankDynaCallback(config)])
    modules = export_model(model)
    entry = save_for_reload(model, tmp_path / arch / "saved", spec.task, spec.auto_class, modules)
    largest_group = max(sum(layer.weight.shape) for layer in targets.values())
    return {**entry, "targets": list(targets), "target_types": {type(t).__name__ for t in targets.values()},
            "dense": dense, "exported": exported_total(modules), "largest_group": largest_group}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Every architecture compressed, trained and saved in this process, then reloaded in one fresh process."""
    tmp_path = tmp_path_factory.mktemp("architectures")
    built, failures = {}, {}
    with single_thread():
        for arch in ARCHITECTURES:
            try:
                built[arch] = _compress_train_save(arch, tmp_path)
            except Exception:  # reported by that architecture's test, so one failure does not hide the others
                failures[arch] = traceback.format_exc()
    manifest = {arch: {k: entry[k] for k in ("folder", "auto_class", "io", "modules")} for arch, entry in built.items()}
    reloaded = reload_in_fresh_process(manifest, tmp_path)
    return built, failures, reloaded


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_compress_train_export_and_reload_in_a_fresh_process(arch, round_trips):
    built, failures, reloaded = round_trips
    assert arch not in failures, failures.get(arch)
    entry, result = built[arch], reloaded["cases"][arch]

    # Default targets: every linear layer of the repeated blocks, nothing from embeddings or heads.
    assert len(entry["targets"]) == EXPECTED_TARGETS[arch]
    assert not any(part in name for name in entry["targets"]
                   for part in ("embed", "lm_head", "classifier", "pooler", "score", "shared"))
    expected_types = {"Conv1D"} if arch == "gpt2" else {"Linear"}
    assert entry["target_types"] == expected_types

    # Budget met: at most the budget, and short of it by less than one singular group.
    target = int(BUDGET * entry["dense"])
    assert target - entry["largest_group"] < entry["exported"] <= target

    # transformers' own loading path, through the registered quantizer, with nothing missing or left over.
    assert result["loaded"], result.get("error")
    assert result["quantizer"] == "LowRankQuantizer"
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == []
    assert result["same_shape"] and result["max_abs_diff"] <= 1e-5
    # Low-rank pairs, or BERT/RoBERTa's default attention channels (kept dims of each head).
    assert {"LowRankLinear", "ScatteredLinear"} & set(result["module_types"])


def test_the_fresh_process_imported_the_package(round_trips):
    assert round_trips[2]["package_imported"]

