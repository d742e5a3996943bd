"""Baselines reported beside the model: what an answer that ignores the image scores on the same test entries.

* Detection, "fixed box (mean training box)": the mean of the training set's truth boxes normalised to the slice
  (x = column / width, y = row / height; one mean per phrase, so AbdomenCT-1K gets one box per organ), put on
  every test entry at that entry's size and scored under STRICT: pixel extents (plus-one IoU), hit IoU >= 0.5,
  mean over every entry with the structure. The box is used as is (no 0-100 grid): it is not an answer text.
  On balanced sets the fixed box always claims the structure, so empty slices are false positives and stay out
  of the mean, as STRICT does with the model's answers.
* Tumour classification: the majority answer of the training set given to every test entry (accuracy and
  balanced accuracy).

The training entries are `tasks/<task>_train.json` of the prepared folder; without them the baseline is stated
as unavailable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.metrics import Variant, box_iou, is_hit, weighted_mean
from training.evaluate_tasks import TaskSet
from training.evaluate_scoring import balanced_task, yes_no_rates

BOX_LABEL = "fixed box (mean training box)"
MAJORITY_LABEL = "majority class of the training set"
TRAIN_SUFFIX = "_train.json"


class _Unavailable(Exception):
    """Why a task has no baseline (no or unusable training entries)."""


def add_baselines(metrics: dict[str, Any], prepared: Path, tasks: list[TaskSet]) -> None:
    """Put a `baseline` beside the model's numbers of every task, organ and combined row of `metrics`
    (the output of `score_all`)."""
    for task in tasks:
        result = metrics["tasks"][task.name]
        label = BOX_LABEL if task.kind == "detection" else MAJORITY_LABEL
        try:
            train = _train_entries(prepared, task.source)
            if task.kind == "detection":
                result["baseline"] = {"label": label, **fixed_box_baseline(task, train, result.get("organs"))}
            else:
                result["baseline"] = {"label": label, **majority_baseline(task, train)}
        except _Unavailable as reason:
            result["baseline"] = {"label": label, "unavailable": str(reason)}
    for combined in metrics["combined"].values():
        combined["baseline"] = _combined([metrics["tasks"][name]["baseline"] for name in combined["tasks"]])


def _train_entries(prepared: Path, task: str) -> list[dict[str, Any]]:
    path = Path(prepared) / "tasks" / f"{task}{TRAIN_SUFFIX}"
    if not path.is_file():
        raise _Unavailable(f"no training set: {path} is missing")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise _Unavailable(f"cannot read {path}: {error}") from error
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise _Unavailable(f"{path} is not a JSON list of entries")
    return entries


# ------------------------------------------------------------------------------------------------ detection

def mean_training_boxes(train: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{phrase: {"box": mean normalised (x_min, y_min, x_max, y_max), "n_train": boxes averaged}}; empty
    slices of balanced sets have no box and are left out."""
    normalised: dict[str, list[tuple[float, ...]]] = {}
    for entry in train:
        if any(entry.get("bbox") or ()):
            x_min, y_min, x_max, y_max = entry["bbox"]
            width, height = entry["width"], entry["height"]
            normalised.setdefault(entry["phrase"], []).append((x_min / width, y_min / height, x_max / width,
                                                               y_max / height))
    return {phrase: {"box": [float(v) for v in np.mean(boxes, axis=0)], "n_train": len(boxes)}
            for phrase, boxes in sorted(normalised.items())}


def fixed_box_ious(task: TaskSet, boxes: dict[str, dict[str, Any]]) -> list[float | None]:
    """The STRICT IoU of the fixed box on each test entry; None where STRICT leaves the entry out of the mean
    (an empty slice of a balanced set)."""
    ious: list[float | None] = []
    for entry in task.entries:
        if not any(entry["bbox"]):
            ious.append(None)
            continue
        if entry["phrase"] not in boxes:
            raise _Unavailable(f"the training set has no {entry['phrase']!r} box")
        x_min, y_min, x_max, y_max = boxes[entry["phrase"]]["box"]
        width, height = entry["width"], entry["height"]
        fixed = (x_min * width, y_min * height, x_max * width, y_max * height)
        ious.append(box_iou(fixed, entry["bbox"], "plus_one"))  # STRICT's pixel-extent convention
    return ious


def _summary(ious: list[float | None]) -> dict[str, Any]:
    scored = [iou for iou in ious if iou is not None]
    hits = sum(is_hit(iou, Variant.STRICT) for iou in scored)
    return {"n": len(ious), "n_scored": len(scored), "mean_iou": float(np.mean(scored)) if scored else 0.0,
            "hit_rate": hits / len(scored) if scored else 0.0}


def fixed_box_baseline(task: TaskSet, train: list[dict[str, Any]],
                       organs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task's fixed-box numbers; with `organs` (the task's per-organ results) each organ gets its own
    `baseline` there. Over all entries at once equals the model's weighting over organs (weights n = n_scored,
    as AbdomenCT-1K has no empty slices)."""
    boxes = mean_training_boxes(train)
    ious = fixed_box_ious(task, boxes)
    for organ, organ_result in (organs or {}).items():
        members = [iou for iou, entry in zip(ious, task.entries) if entry.get("organ") == organ]
        organ_result["baseline"] = {"label": BOX_LABEL, "protocol": "STRICT", **_summary(members)}
    return {"protocol": "STRICT", "balanced": balanced_task(task), **_summary(ious), "boxes": boxes}


def _combined(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Datasets combined as the model's "weighted" rows are: sum(metric * n) / sum(n)."""
    missing = [member["unavailable"] for member in members if "unavailable" in member]
    if missing:
        return {"label": BOX_LABEL, "unavailable": "; ".join(missing)}
    counts = [member["n"] for member in members]
    return {"label": BOX_LABEL, "protocol": "STRICT", "n": sum(counts),
            **{key: weighted_mean([member[key] for member in members], counts) for key in ("mean_iou", "hit_rate")}}


# --------------------------------------------------------------------------------------------------- yes/no

def _is_yes(answer: Any) -> bool:
    return str(answer).strip().lower() == "yes"


def majority_baseline(task: TaskSet, train: list[dict[str, Any]]) -> dict[str, Any]:
    """The training set's majority answer for every test entry. A tie (our tumour set is balanced by
    construction) answers "no", the answer of a healthy slice."""
    if not train:
        raise _Unavailable("the training set is empty")
    n_yes = sum(_is_yes(entry.get("answer")) for entry in train)
    says_yes = n_yes > len(train) - n_yes
    positives = sum(_is_yes(entry["answer"]) for entry in task.entries)
    negatives = len(task.entries) - positives
    tp, fn, tn, fp = (positives, 0, 0, negatives) if says_yes else (0, positives, negatives, 0)
    return {"answer": "yes" if says_yes else "no", "n_train": {"yes": n_yes, "no": len(train) - n_yes},
            "n": len(task.entries), "accuracy": (tp + tn) / len(task.entries),
            "balanced_accuracy": yes_no_rates(tp, tn, fp, fn)["balanced_accuracy"]}
