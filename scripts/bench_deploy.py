"""Dense against RankDyna as deployed: dev metric, size on disk and latency in PyTorch, torch int8, ONNX Runtime and
ONNX Runtime int8, side by side in one process (docs/DEPLOY.md).

    python scripts/bench_deploy.py --model dense=outputs/sst2-dense --model "rankdyna 0.5=outputs/sst2-rankdyna" \\
        --glue_dir ../shared/data/glue --output_json docs/deploy_results.json

Each ``--model NAME=FOLDER`` is a fine-tuned classifier saved by scripts/run_glue.py (dense, or compressed). The
first one is the reference of the speed-up column and, with ``--update_cards``, its metric is written as "dense
model" into the model card (README.md) of every other compressed folder.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, however it is installed

from rankdyna_trainer.deploy import write_model_card  # noqa: E402
from rankdyna_trainer.experiment.deploy_bench import RUNTIMES, benchmark, markdown_table  # noqa: E402
from rankdyna_trainer.quantizer import is_compressed_model_dir  # noqa: E402


def named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--model takes NAME=FOLDER (e.g. dense=outputs/sst2-dense), got {text!r}.")
    return name, folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=named_folder, action="append", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--task_name", default="sst2")
    parser.add_argument("--glue_dir", default=None, help="GLUE TSV folder (default: $GLUE_DIR, else the hub)")
    parser.add_argument("--max_seq_length", type=int, default=64, help="dev-set truncation (the main job's 64)")
    parser.add_argument("--timing_batch", type=int, default=32)
    parser.add_argument("--timing_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--dev_limit", type=int, default=None, help="first N dev examples only (quick checks)")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--update_cards", action="store_true",
                        help="write the first model's metric as 'dense model' into the other folders' model cards")
    return parser.parse_args(argv)


def update_cards(result: dict, models: dict[str, str]) -> None:
    metric_of = {r["model"]: r["metric"] for r in result["rows"] if r["runtime"] == "torch"}
    reference = next(iter(models))
    for name, folder in models.items():
        if name != reference and is_compressed_model_dir(folder) and name in metric_of:
            write_model_card(folder, metric_name=f"dev {result['metric']}", metric=metric_of[name],
                             dense_metric=metric_of.get(reference), floor=result["floor"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = dict(args.model)
    result = benchmark(models, args.task_name, args.glue_dir, args.max_seq_length,
                       timing_shape=(args.timing_batch, args.timing_length), rounds=args.rounds,
                       threads=args.threads, dev_limit=args.dev_limit, runtimes=tuple(args.runtimes))
    result["models"] = models
    print(markdown_table(result))
    print(f"\n{result['dev_examples']} dev examples (length {result['max_length']}); median of {result['rounds']} "
          f"round-robin forwards; {result['threads']} threads; {result['cpu']}")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    if args.update_cards:
        update_cards(result, models)
    return result


if __name__ == "__main__":
    main()
