"""Learning-rate control for the perplexity benchmark: one table, every fine-tuned method at every learning rate.

scripts/benchmark_lm.py runs one learning rate per runs folder (``--lr X --runs-dir benchmarks/lm_lrX``); this reads
the results JSON of each folder and prints, per method and budget, seed 0's held-out perplexity at each learning
rate (with the mean where more seeds ran), then each method at its own best rate side by side (by default the
fine-tuned methods of the issue-11 table).

    python scripts/lm_lr_table.py                                   # docs/results_lm.json + benchmarks/lm_lr*/
    python scripts/lm_lr_table.py --out docs/LM_LR_CONTROL.md

The best rate is chosen on the same held-out blocks the table reports (there is no separate validation split at
this size), so every method's best cell is equally optimistic.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(paths: list[str]) -> dict[tuple[str, float], dict[float, dict]]:
    """(method, budget) -> lr -> aggregated result of the fine-tuned runs in each results file."""
    table: dict[tuple[str, float], dict[float, dict]] = {}
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        lr = results["_meta"]["settings"]["lr"]
        for key, row in results.items():
            if key.startswith("_"):
                continue
            cell = table.setdefault((row["method"], row["budget"]), {})
            if lr in cell:
                raise SystemExit(f"{path}: {key} at lr {lr} is also in another results file; give each lr once")
            cell[lr] = row
    return table


def fmt_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-")


def seed0(row: dict) -> float:
    """The learning rate is picked on seed 0, the one seed every cell has, so the cells compare like for like."""
    return row["perplexity_seeds"][row["seeds"].index(0)]


def fmt(row: dict | None, best: bool) -> str:
    if row is None:
        return ""
    text = f"{seed0(row):.1f}"
    text = f"**{text}**" if best else text
    n = len(row["seeds"])
    return text + (f" (mean {row['perplexity']:.1f}, n={n})" if n > 1 else "")


def render(table: dict, methods: list[str] | None) -> str:
    lrs = sorted({lr for cells in table.values() for lr in cells})
    keys = sorted((k for k in table if methods is None or k[0] in methods), key=lambda k: (-k[1], k[0]))
    lines = ["| method @ kept | " + " | ".join(f"lr {fmt_lr(lr)}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for method, budget in keys:
        cells = table[(method, budget)]
        best = min(cells, key=lambda lr: seed0(cells[lr]))
        lines.append(f"| {method} @ {budget:g} | " + " | ".join(fmt(cells.get(lr), lr == best) for lr in lrs) + " |")
    lines += ["", "Each method at its best learning rate on seed 0, then every seed measured at that rate:", "",
              "| kept | method | best lr | mean perplexity | seeds | per seed |", "|---|---|---|---|---|---|"]
    for budget in sorted({b for _, b in keys}, reverse=True):
        rows = []
        for method in sorted({m for m, b in keys if b == budget}):
            cells = table[(method, budget)]
            lr = min(cells, key=lambda x: seed0(cells[x]))
            rows.append((cells[lr]["perplexity"], method, lr, cells[lr]))
        for ppl, method, lr, row in sorted(rows):
            per_seed = ", ".join(f"{p:.1f}" for p in row["perplexity_seeds"])
            seeds = ", ".join(str(x) for x in row["seeds"])
            lines.append(f"| {budget:g} | {method} | {fmt_lr(lr)} | {ppl:.1f} | {seeds} | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", help="results JSON files of benchmark_lm.py, one learning rate each "
                        "(default: docs/results_lm.json and benchmarks/lm_lr*/results.json)")
    parser.add_argument("--methods", nargs="+", default=["rankdyna", "lorap_ft", "svdllm_ft", "rankdyna_singular_ffn"])
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    paths = args.results or [os.path.join(REPO, "docs", "results_lm.json"),
                             *sorted(glob.glob(os.path.join(REPO, "benchmarks", "lm_lr*", "results.json")))]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error(f"results file not found: {missing[0]}")
    text = render(load(paths), args.methods)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
