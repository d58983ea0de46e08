"""GLUE tasks: what each one is, and reading its files offline (standard GLUE TSV layout) or from the hub."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import datasets
import pandas as pd


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str
    text_columns: tuple[str, ...]  # output column names, as in the hub's nyu-mll/glue dataset
    file_columns: tuple[str, ...]  # the TSV columns they come from, in the same order
    label_column: str | None  # TSV column of the label (None: no labels in the file)
    label_names: tuple[str, ...]  # empty for regression
    dev_files: tuple[str, ...] = ("dev.tsv",)
    has_header: bool = True
    headerless_columns: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"),
                 has_header=False, headerless_columns=("source", "label", "original_label", "sentence")),
        GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive")),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                 ("not_equivalent", "equivalent")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                 ("not_duplicate", "duplicate")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", ()),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                 ("entailment", "neutral", "contradiction"), dev_files=("dev_matched.tsv", "dev_mismatched.tsv")),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                 ("entailment", "not_entailment")),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("entailment", "not_entailment")),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                 ("not_entailment", "entailment")),
    )
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


def default_glue_dir() -> str | None:
    return os.environ.get("GLUE_DIR")


def read_glue_tsv(task: GlueTask | str, path: str, limit: int | None = None) -> datasets.Dataset:
    """One GLUE TSV file as a Dataset with the hub's column names and integer (or float) labels."""
    task = get_task(task) if isinstance(task, str) else task
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GLUE {task.name} file not found: {path}")
    frame = pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8-sig",
        header=0 if task.has_header else None, names=None if task.has_header else list(task.headerless_columns),
        nrows=limit, on_bad_lines="skip",
    )
    needed = list(task.file_columns) + ([task.label_column] if task.label_column else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} that GLUE {task.name} needs; it has "
                         f"{list(frame.columns)}. Is it the right task's file?")
    data = {out: frame[src].tolist() for out, src in zip(task.text_columns, task.file_columns)}
    data["label"] = _labels(task, frame[task.label_column], path)
    return datasets.Dataset.from_dict(data)


def _labels(task: GlueTask, column: pd.Series, path: str) -> list:
    if task.is_regression:
        return column.astype(float).tolist()
    lookup = {name: i for i, name in enumerate(task.label_names)}
    lookup.update({str(i): i for i in range(len(task.label_names))})
    unknown = sorted(set(column) - set(lookup))
    if unknown:
        raise ValueError(f"{path} has labels {unknown[:5]} that are not GLUE {task.name} labels "
                         f"{list(task.label_names)} (or their indices).")
    return [lookup[v] for v in column]


def load_glue(task: GlueTask | str, glue_dir: str | None = None, limit: int | None = None) -> datasets.DatasetDict:
    """Train and dev splits (``validation``, or ``validation_matched``/``_mismatched`` for MNLI).

    Reads ``glue_dir/<Folder>/*.tsv`` when a folder is given (or ``$GLUE_DIR`` is set), else the hub.
    ``limit`` keeps the first rows of each split (for quick runs and tests).
    """
    task = get_task(task) if isinstance(task, str) else task
    glue_dir = glue_dir or default_glue_dir()
    if glue_dir is None:
        hub = datasets.load_dataset("nyu-mll/glue", task.name)
        hub = hub.remove_columns([c for c in ("idx",) if c in hub["train"].column_names])
        return datasets.DatasetDict({k: v.select(range(min(limit, len(v)))) if limit else v for k, v in hub.items()
                                     if k != "test" and not k.startswith("test_")})
    folder = os.path.join(glue_dir, task.folder)
    if not os.path.isdir(folder):
        present = sorted(os.listdir(glue_dir)) if os.path.isdir(glue_dir) else "the folder does not exist"
        raise FileNotFoundError(f"No {task.folder}/ folder for GLUE {task.name} in {glue_dir!r} (it holds: {present}). "
                                "Point --glue_dir / $GLUE_DIR at a folder in the standard GLUE layout.")
    splits = {"train": read_glue_tsv(task, os.path.join(folder, "train.tsv"), limit)}
    for dev_file in task.dev_files:
        suffix = dev_file.removeprefix("dev").removesuffix(".tsv")  # "" or "_matched"/"_mismatched"
        splits["validation" + suffix] = read_glue_tsv(task, os.path.join(folder, dev_file), limit)
    return datasets.DatasetDict(splits)


def load_glue_files(task: GlueTask | str, train_file: str | None, validation_file: str | None,
                    limit: int | None = None) -> datasets.DatasetDict:
    """Train and/or dev split from explicit TSV files in the task's GLUE format (e.g. a re-split or a subset)."""
    task = get_task(task) if isinstance(task, str) else task
    files = {"train": train_file, "validation": validation_file}
    return datasets.DatasetDict({split: read_glue_tsv(task, path, limit) for split, path in files.items() if path})
