import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("lm_lr_table", REPO / "scripts" / "lm_lr_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path: Path, lr: float, rows: dict[str, list[tuple[int, float]]]) -> str:
    """A results file as scripts/benchmark_lm.py writes it: per method@budget, seeds and perplexities."""
    data = {"_meta": {"settings": {"lr": lr}}}
    for key, seeds in rows.items():
        method, budget = key.split("@")
        ppl = [p for _, p in seeds]
        data[key] = {"method": method, "budget": float(budget), "perplexity": sum(ppl) / len(ppl),
                     "perplexity_seeds": ppl, "seeds": [s for s, _ in seeds]}
    path.write_text(json.dumps(data))
    return str(path)


def test_best_rate_is_picked_on_seed_0_and_reported_with_every_seed_at_that_rate(tmp_path, capsys):
    table = _load_script()
    low = _results(tmp_path / "low.json", 5e-5, {"rankdyna@0.5": [(0, 250.0), (1, 240.0), (2, 260.0)],
                                                 "lorap_ft@0.5": [(0, 290.0)]})
    # seed 0 is worse at the high rate for rankdyna, better for lorap_ft; a lower 3-seed mean must not win
    high = _results(tmp_path / "high.json", 2e-4, {"rankdyna@0.5": [(0, 262.0)],
                                                   "lorap_ft@0.5": [(0, 212.0), (1, 220.0)]})
    table.main([low, high, "--out", str(tmp_path / "table.md")])
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "table.md").read_text()
    best = [line for line in printed.splitlines() if line.startswith("| 0.5 |")]
    assert best == ["| 0.5 | lorap_ft | 2.0e-4 | 216.0 | 0, 1 | 212.0, 220.0 |",
                    "| 0.5 | rankdyna | 5.0e-5 | 250.0 | 0, 1, 2 | 250.0, 240.0, 260.0 |"]
    assert "| rankdyna @ 0.5 | **250.0** (mean 250.0, n=3) | 262.0 |" in printed


def test_the_same_rate_in_two_files_is_refused(tmp_path):
    table = _load_script()
    a = _results(tmp_path / "a.json", 1e-4, {"rankdyna@0.8": [(0, 90.0)]})
    b = _results(tmp_path / "b.json", 1e-4, {"rankdyna@0.8": [(0, 91.0)]})
    with pytest.raises(SystemExit, match="also in another results file"):
        table.main([a, b])


def test_a_missing_results_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load_script().main([str(tmp_path / "nope.json")])
    assert "nope.json" in capsys.readouterr().err
