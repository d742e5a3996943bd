"""Task sets cut from the slice records and the shared split, written as `OUT/tasks/<task>_<split>.json`.

Splits are train and test, plus val when the split has one (`--val-ratio`): a val file is cut from the val
volumes by exactly the rules of the train file (threshold, balancing, sampling), so a metric on it measures
the task the stage trains on; val volumes appear in no train or test file.

Each entry is the slice's record (upstream's keys and ours) plus `task`, `image` (PNG path relative to OUT),
`answer` (the training target) and `q_id` (1..n per file); detection entries add `phrase` and `bbox`.
A slice is selected when its box ratio is strictly greater than `threshold` (upstream's 0.6 rule on the
2-decimal ratio); the test files may use their own `test_threshold` (0: every slice with the structure, the strict
protocol), so that a model trained on large cross-sections is still scored on the small end slices a user meets.
Every random choice uses `random.Random` seeded with (seed, task, volume or split).

- `pancreas_detection_{nih,msd}`, `tumor_detection_msd`: upstream's refer sets; answer `{<x1><y1><x2><y2>}`.
- `*_balanced_*`: per volume, the selected slices plus as many randomly drawn slices without the structure
  (fewer if the volume has fewer), answered `{<0><0><0><0>}` with bbox [0, 0, 0, 0]; as upstream.
- `multi_organ_abdomenct1k`: one entry per (slice, organ) for liver, kidney (the patient's right kidney,
  upstream's meaning), spleen and pancreas, with upstream's compact keys (organ, pixels, pixels_ratio, bbox,
  bbox_ratio); with organ balancing (default, as upstream) every organ is subsampled to the rarest one's count.
- `tumor_classification` (ours, the default for training): positives and negatives come from the MSD volumes of
  one split, full slices, selected by ONE rule: the slices with pancreas (tumour included) box ratio >
  threshold, answered "yes" when they hold a tumour pixel and "no" otherwise. The two classes are then paired
  across the split's volumes by pancreas box ratio and level (`matching.py`), so that neither answers the
  question; the ROC AUC of each alone is in summary.json (`shortcuts`). (Before: positives by tumour box
  ratio, negatives by pancreas box ratio; then one rule with per-volume matching, which still left pancreas box
  ratio predicting the answer with AUC 0.75-0.81 on the demo phantoms.)
- `tumor_classification_upstream` (to reproduce the paper only): positives = all MSD tumour-detection slices,
  negatives = as many NIH pancreas-detection slices drawn at random, every image cropped to the ground-truth
  pancreas box with PIL's exclusive right/bottom (the last row and column are lost) and written to
  `OUT/tasks/tumor_classification_upstream_crops/`; width/height are the crop's. It confounds hospital with
  label and uses an oracle crop (docs/datasets.md, flaw 2). Crops with zero width or height are left out.
  Its val file pairs the val entries of the two sets it is derived from, like its train and test files.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from training.prepare.files import atomic_save_png, atomic_write_json
from training.prepare.matching import match_classes, with_pancreas_level
from training.prepare.records import ABD_ORGANS

TC = "tumor_classification"
TC_UPSTREAM = "tumor_classification_upstream"
_PHRASES = {"pancreas": "pancreas", "tumor": "pancreatic tumor"}
_ABD_KEYS = ("dataset", "volume_name", "slice_id", "slice_index", "slice_count", "width", "height", "volume",
             "image", "source_file", "source_voxel_index", "spacing", "content_hash", "volume_hash")


class TaskBuilder:
    """Collects task entries volume by volume (records need not all fit in memory at once)."""

    def __init__(self, threshold: float, seed: int, organ_balance: bool = True,
                 splits: tuple[str, ...] = ("train", "test"), test_threshold: float | None = None) -> None:
        self.threshold, self.seed, self.organ_balance = threshold, seed, organ_balance
        self.test_threshold = threshold if test_threshold is None else test_threshold
        self.splits = splits  # every task gets one file per split, even an empty one
        self.entries: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.tc_candidates: dict[str, list[dict[str, Any]]] = {}  # split: records, paired in finish()
        self.tc_tolerances: dict[str, tuple[float, float]] = {}  # split: (ratio, level) tolerances of its pairs

    def add_volume(self, dataset: str, volume: str, split: str, records: list[dict[str, Any]]) -> None:
        """Add the entries one volume contributes to every task of its dataset."""
        if dataset in ("nih", "msd"):
            self._detection(f"pancreas_detection_{dataset}", "pancreas", split, records, volume)
        if dataset == "msd":
            self._detection("tumor_detection_msd", "tumor", split, records, volume)
            self._tumor_classification(split, records)
        if dataset == "abdomenct1k":
            self._multi_organ(split, records)

    def finish(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Cross-volume steps (tumour yes/no pairing, organ balance, upstream TC), then q_ids;
        {task: {split: entries}}."""
        for split, candidates in self.tc_candidates.items():
            self._tumor_classification_pairs(split, candidates)
        if self.organ_balance and "multi_organ_abdomenct1k" in self.entries:
            for split, entries in self.entries["multi_organ_abdomenct1k"].items():
                self.entries["multi_organ_abdomenct1k"][split] = self._balance_organs(split, entries)
        if "tumor_detection_msd" in self.entries and "pancreas_detection_nih" in self.entries:
            self._tumor_classification_upstream()
        for by_split in self.entries.values():
            for entries in by_split.values():
                for q_id, entry in enumerate(entries, start=1):
                    entry["q_id"] = q_id
        return {task: self.entries[task] for task in sorted(self.entries)}

    def _add(self, task: str, split: str, entries: list[dict[str, Any]]) -> None:
        by_split = self.entries.setdefault(task, {name: [] for name in self.splits})
        by_split[split].extend(entries)

    def _threshold(self, split: str) -> float:
        return self.test_threshold if split == "test" else self.threshold

    def _rng(self, *parts: str) -> random.Random:
        return random.Random("/".join([str(self.seed), *parts]))

    def _detection(self, task: str, target: str, split: str, records: list[dict], volume: str) -> None:
        positives = [r for r in records if r[f"{target}_bbox_ratio"] > self._threshold(split)]
        self._add(task, split, [_detection_entry(r, task, target) for r in positives])
        balanced = task.replace("_detection", "_detection_balanced")
        absent = [r for r in records if r[f"pixels_{target}"] == 0] if positives else []
        drawn = self._rng(balanced, volume).sample(absent, min(len(positives), len(absent)))
        chosen = sorted(positives + drawn, key=lambda r: r["slice_index"])
        self._add(balanced, split, [_detection_entry(r, balanced, target) for r in chosen])

    def _tumor_classification(self, split: str, records: list[dict]) -> None:
        # One selection rule for both answers; the pairing across the split's volumes happens in finish().
        candidates = [r for r in records if r["pancreas_bbox_ratio"] > self._threshold(split)]
        self.tc_candidates.setdefault(split, []).extend(with_pancreas_level(records, candidates))
        self._add(TC, split, [])  # the task's files exist even when no pair is found

    def _tumor_classification_pairs(self, split: str, candidates: list[dict]) -> None:
        positives = [r for r in candidates if r["pixels_tumor"] > 0]
        negatives = [r for r in candidates if r["pixels_tumor"] == 0]
        kept, self.tc_tolerances[split] = match_classes(positives, negatives, self._rng(TC, split))
        self._add(TC, split, [{**r, "task": TC, "answer": "yes" if r["pixels_tumor"] > 0 else "no"} for r in kept])

    def _multi_organ(self, split: str, records: list[dict]) -> None:
        from SlicerMiniGPTPancreas.grammar import render_box

        entries = []
        for r in records:
            for organ in ABD_ORGANS:
                if r[f"{organ}_bbox_ratio"] > self._threshold(split):
                    entry = {key: r[key] for key in _ABD_KEYS}
                    entry.update(task="multi_organ_abdomenct1k", organ=organ, phrase=organ,
                                 pixels=r[f"pixels_{organ}"], pixels_ratio=r[f"{organ}_pixels_ratio"],
                                 bbox=r[f"bbox_{organ}"], bbox_ratio=r[f"{organ}_bbox_ratio"],
                                 answer=render_box(r[f"bbox_{organ}"], r["width"], r["height"]))
                    entries.append(entry)
        self._add("multi_organ_abdomenct1k", split, entries)

    def _balance_organs(self, split: str, entries: list[dict]) -> list[dict]:
        """Subsample every organ present to the rarest organ's count (upstream's balance_entries_overall)."""
        indices_by_organ: dict[str, list[int]] = {}
        for index, entry in enumerate(entries):
            indices_by_organ.setdefault(entry["organ"], []).append(index)
        if not indices_by_organ:
            return entries
        rarest = min(len(indices) for indices in indices_by_organ.values())
        kept = sorted(index for organ, indices in indices_by_organ.items()
                      for index in self._rng("multi_organ_abdomenct1k", split, organ).sample(indices, rarest))
        return [entries[index] for index in kept]

    def _tumor_classification_upstream(self) -> None:
        for split in self.splits:
            positives = self.entries["tumor_detection_msd"][split]
            negatives = self.entries["pancreas_detection_nih"][split]
            drawn = self._rng(TC_UPSTREAM, split).sample(negatives, min(len(positives), len(negatives)))
            entries = [_crop_entry(e, "yes") for e in positives] + [_crop_entry(e, "no") for e in drawn]
            self._add(TC_UPSTREAM, split, [e for e in entries if e["width"] > 0 and e["height"] > 0])


def _detection_entry(record: dict, task: str, target: str) -> dict[str, Any]:
    """A refer entry; a slice without the structure has bbox [0, 0, 0, 0] and the absent answer."""
    from SlicerMiniGPTPancreas.grammar import ABSENT_ANSWER, render_box

    bbox = record[f"bbox_{target}"]
    present = record[f"pixels_{target}"] > 0
    answer = render_box(bbox, record["width"], record["height"]) if present else ABSENT_ANSWER
    return {**record, "task": task, "phrase": _PHRASES[target], "bbox": list(bbox), "answer": answer}


def _crop_entry(entry: dict, answer: str) -> dict[str, Any]:
    x_min, y_min, x_max, y_max = entry["bbox_pancreas"]
    name = Path(entry["image"]).name
    cropped = {key: value for key, value in entry.items() if key not in ("phrase", "bbox", "q_id")}
    cropped.update(task=TC_UPSTREAM, answer=answer, source_image=entry["image"], width=x_max - x_min,
                   height=y_max - y_min, image=f"tasks/{TC_UPSTREAM}_crops/{name}")
    return cropped


def write_tasks(out: Path, tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, int]]:
    """Write every task file (and the upstream TC crops), remove stale val files; return {task: {split: count}}."""
    counts = {}
    for task, by_split in tasks.items():
        for split, entries in by_split.items():
            if task == TC_UPSTREAM:
                _write_crops(out, entries)
            atomic_write_json(out / "tasks" / f"{task}_{split}.json", entries, only_if_changed=True)
        if "val" not in by_split:
            # left by an earlier run with --val-ratio: its volumes are now in train, so epochs picked on it would
            # be picked on training data
            (out / "tasks" / f"{task}_val.json").unlink(missing_ok=True)
        counts[task] = {split: len(entries) for split, entries in by_split.items()}
    return counts


def _write_crops(out: Path, entries: list[dict[str, Any]]) -> None:
    import numpy as np
    from PIL import Image

    for entry in entries:
        x_min, y_min, x_max, y_max = entry["bbox_pancreas"]
        with Image.open(out / entry["source_image"]) as full:
            crop = full.convert("RGB").crop((x_min, y_min, x_max, y_max))  # exclusive right/bottom, as upstream
        atomic_save_png(out / entry["image"], np.asarray(crop), only_if_changed=True)

