"""Every baseline method through the registry on an encoder (BERT) and on GPT-2 (transformers Conv1D layers):
default targets, compress or prepare, 4 real Trainer steps, ``save_pretrained``, and ``AutoModelFor....from_pretrained``
in a fresh interpreter (one for all folders) that reproduces the in-memory outputs; the exported size within budget.
"""

from __future__ import annotations

import traceback

import pytest

from rankdyna_trainer.methods import get_method
from rankdyna_trainer.targets import find_target_linears

from ..round_trip import exported_total, reload_in_fresh_process, save_for_reload, single_thread, train_steps
from ..tiny_models import ARCHITECTURES, torch_batches

BUDGET = 0.5
METHODS = ["svd", "fwsvd", "tfwsvd", "ars", "lorap", "mpo", "adalora"]
MODELS = ["bert", "gpt2"]
# Small settings that keep each method's own loop short on tiny models.
SETTINGS = {"fwsvd": {"max_fisher_batches": 2}, "tfwsvd": {"max_fisher_batches": 2, "als_iterations": 2},
            "ars": {"max_fisher_batches": 2, "mask_steps": 5, "hidden_size": 8},
            "lorap": {"max_calibration_batches": 2}, "adalora": {"target_rank": 2, "init_rank": 4}}


def _compress_train_save(method_name: str, arch: str, tmp_path) -> dict:
    spec, method = ARCHITECTURES[arch], get_method(method_name)
    model = spec.build()
    targets = find_target_linears(model)
    dense = sum(layer.weight.numel() for layer in targets.values())
    config = method.make_config(target_budget=BUDGET, model=model, total_steps=4, **SETTINGS.get(method_name, {}))
    folder = tmp_path / f"{method_name}-{arch}"
    if method.post_hoc:
        modules = method.compress(model, config, torch_batches(spec.task))
        train_steps(model, spec.task, folder / "run")  # the second round: fine-tune the compressed model
    else:
        model, callbacks = method.prepare(model, config)
        train_steps(model, spec.task, folder / "run", callbacks=callbacks)
        model, modules = method.export(model)
    entry = save_for_reload(model, folder / "saved", spec.task, spec.auto_class, modules)
    return {**entry, "dense": dense, "exported": exported_total(modules), "n_targets": len(targets),
            "types": sorted({e["type"] for e in modules.values()})}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("methods")
    built, failures = {}, {}
    with single_thread():
        for method in METHODS:
            for arch in MODELS:
                try:
                    built[f"{method}-{arch}"] = _compress_train_save(method, arch, tmp_path)
                except Exception:  # reported by that case's test, so one failure does not hide the others
                    failures[f"{method}-{arch}"] = traceback.format_exc()
    manifest = {case: {k: e[k] for k in ("folder", "auto_class", "io", "modules")} for case, e in built.items()}
    return built, failures, reload_in_fresh_process(manifest, tmp_path)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_method_round_trip(method, arch, round_trips):
    built, failures, reloaded = round_trips
    case = f"{method}-{arch}"
    assert case not in failures, failures.get(case)
    entry, result = built[case], reloaded["cases"][case]
    assert result["loaded"], result.get("error")
    assert result["missing"] == [] and result["unexpected"] == [] and result["mismatched"] == []
    assert result["same_shape"] and result["max_abs_diff"] <= 1e-5

    if method == "adalora":  # adapters merged: the plain dense architecture, loaded without the quantizer
        assert entry["modules"] == [] and result["quantizer"] == "NoneType"
        return
    assert result["quantizer"] == "LowRankQuantizer"
    assert len(entry["modules"]) == entry["n_targets"]  # every default target was compressed
    assert entry["exported"] <= BUDGET * entry["dense"]
    # Within a few singular groups (or FFN channels, or MPO bonds) of the budget: it was used, not wasted.
    assert entry["exported"] >= 0.75 * BUDGET * entry["dense"]
    if arch == "gpt2" and method != "mpo":
        # GPT-2's layers are Conv1D; dense-kept ones must stay Conv1D so the saved weights keep their layout.
        assert set(entry["types"]) <= {"low_rank", "conv1d"}
