"""The end-of-run summary: slices per box-ratio threshold per split, like Table 1 of the paper.

For every dataset, structure and split: the number of volumes, of slices, of slices showing the structure
(`with`: at least one labelled pixel) and of slices whose box ratio is strictly above each threshold (the
rule the task sets use). Written to `OUT/summary.json` together with the task-set sizes and the problems of
the run, and printed as a table. With a val split (`--val-ratio`), val rows and columns sit between train and test.
"""

from __future__ import annotations

from typing import Any

from training.prepare.files import DATASETS, UPSTREAM_DATASET
from training.prepare.records import ABD_ORGANS

DEFAULT_THRESHOLDS = (0.2, 0.4, 0.6, 0.8)
_SPLIT_ORDER = ("train", "val", "test")
_TABLE_STRUCTURES = {"nih": ("pancreas",), "msd": ("pancreas", "tumor"), "abdomenct1k": ABD_ORGANS}


class SliceCounter:
    """Accumulates the table volume by volume."""

    def __init__(self, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> None:
        self.thresholds = tuple(thresholds)
        self.rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add_volume(self, dataset: str, split: str, records: list[dict[str, Any]]) -> None:
        for structure in _TABLE_STRUCTURES[dataset]:
            row = self.rows.setdefault((dataset, structure, split), {
                "dataset": dataset, "structure": structure, "split": split, "volumes": 0, "slices": 0,
                "with": 0, "above": {str(t): 0 for t in self.thresholds}})
            row["volumes"] += 1
            row["slices"] += len(records)
            row["with"] += sum(1 for r in records if r[f"pixels_{structure}"] > 0)
            for t in self.thresholds:
                row["above"][str(t)] += sum(1 for r in records if r[f"{structure}_bbox_ratio"] > t)

    def table(self) -> list[dict[str, Any]]:
        """Rows sorted by dataset, structure, split (train, val, test)."""

        def order(key: tuple[str, str, str]) -> tuple:
            dataset, structure, split = key
            return DATASETS.index(dataset), _TABLE_STRUCTURES[dataset].index(structure), _SPLIT_ORDER.index(split)

        return [self.rows[key] for key in sorted(self.rows, key=order)]


def format_table(rows: list[dict[str, Any]], thresholds: tuple[float, ...],
                 task_counts: dict[str, dict[str, int]]) -> str:
    """The printed summary: the slice table, then the task-set sizes."""
    headers = ["dataset", "structure", "split", "volumes", "slices", "with"] + [f">{t:g}" for t in thresholds]
    lines = [[UPSTREAM_DATASET[r["dataset"]], r["structure"], r["split"], r["volumes"], r["slices"], r["with"]]
             + [r["above"][str(t)] for t in thresholds] for r in rows]
    text = ["Slices per split and box-ratio threshold (a slice counts when its ratio is > t):",
            _columns(headers, lines)]
    if task_counts:
        splits = [split for split in _SPLIT_ORDER if any(split in counts for counts in task_counts.values())]
        text += ["", "Task sets (entries):",
                 _columns(["task", *splits], [[task, *(counts.get(split, 0) for split in splits)]
                                              for task, counts in task_counts.items()])]
    return "\n".join(text)


def format_shortcuts(shortcuts: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per yes/no task and split: the ROC AUC of each pancreas measure alone (0.5: no shortcut) and the
    (box ratio, level) tolerances its classes were matched with."""
    lines = [""]
    for task, by_split in shortcuts.items():
        for split, report in by_split.items():
            aucs = ", ".join(f"{name} {'-' if auc is None else f'{auc:.3f}'}" for name, auc in report["auc"].items())
            tolerances = "" if report["tolerances"] is None else " (matched within {:g}, {:g})".format(
                *report["tolerances"])
            lines.append(f"{task} {split}: shortcut ROC AUC {aucs}{tolerances}")
    return "\n".join(lines)


def _columns(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    formatted = []
    for row in cells:
        # text columns left-aligned, numbers right-aligned
        formatted.append("  ".join(value.rjust(w) if value.replace(".", "").isdigit() else value.ljust(w)
                                   for value, w in zip(row, widths)).rstrip())
    return "\n".join(formatted)
