"""Per-slice records with the paper's keys (appendix A), computed on model-view label slices.

For each structure `o` of a dataset, every slice gets `pixels_{o}`, `{o}_pixels_ratio`, `max_pixels_{o}`,
`bbox_{o}`, `{o}_bbox_ratio`, `max_bbox_{o}` exactly as upstream's `*_generate_slices_info.py` computes them:
- `bbox_{o}` = [x_min, y_min, x_max, y_max], inclusive pixel indices in the PNG (x = column), [0, 0, 0, 0] if
  the slice has none of the structure;
- box area = (x_max - x_min) * (y_max - y_min), WITHOUT +1 (upstream's rule, so a one-pixel-wide box has area
  0); `max_bbox_{o}` is the largest such area in the volume and `max_pixels_{o}` the largest pixel count;
- ratios are this slice's value over the volume's maximum, rounded to 2 decimals (0 when the maximum is 0),
  which is what the `> threshold` selection of the task sets compares.
Structures: NIH `pancreas` (label > 0); MSD `pancreas` (labels 1 and 2) and `tumor` (label 2); AbdomenCT-1K
`liver` (1), `kidney`, `spleen` (3), `pancreas` (4), `right_kidney` and `left_kidney`. AbdomenCT-1K labels both
kidneys 2: they are split into 3D connected components and each component is assigned to the patient's right
or left by its centroid against the body's midline (model-view columns run from patient right to left, so this
is a comparison of world x; the midline, not RAS x = 0, because file origins are arbitrary). `kidney` keeps
upstream's meaning, the patient's RIGHT kidney only (upstream evaluated the "right kidney" under the name
"kidney"); `left_kidney` is extra. Upstream's `pixels_kidney` counted both kidneys; ours counts the right one,
like its box.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.prepare.files import UPSTREAM_DATASET

ABD_ORGANS = ("liver", "kidney", "spleen", "pancreas")  # upstream's multi-organ targets
_BODY_HU = -500.0  # voxels above this are the patient (or the table), not air


def label_ids(dataset: str) -> tuple[int, ...]:
    """The label values a dataset's label files may hold."""
    return {"nih": (0, 1), "msd": (0, 1, 2), "abdomenct1k": (0, 1, 2, 3, 4)}[dataset]


def structure_stats(dataset: str, labels: np.ndarray, hu: np.ndarray) -> dict[str, dict[str, list]]:
    """Per-structure slice statistics of a model-view label array [S, R, C] (hu: the model-view HU).

    Masks are built one structure at a time, so memory holds at most two boolean volumes.
    """
    if dataset == "nih":
        return {"pancreas": mask_stats(labels > 0)}
    if dataset == "msd":
        return {"pancreas": mask_stats(labels > 0), "tumor": mask_stats(labels == 2)}
    right, left = split_kidneys(labels == 2, hu)
    right_stats, left_stats = mask_stats(right), mask_stats(left)
    del right, left
    return {"liver": mask_stats(labels == 1), "kidney": right_stats, "spleen": mask_stats(labels == 3),
            "pancreas": mask_stats(labels == 4), "right_kidney": right_stats, "left_kidney": left_stats}


def split_kidneys(kidneys: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) masks [S, R, C]: 3D components of `kidneys` on either side of the body's midline column."""
    from scipy import ndimage

    components, _ = ndimage.label(kidneys)  # int32 [S, R, C], 6-connected
    midline = _body_midline_column(hu)
    right_ids = []
    for component_id, bounds in enumerate(ndimage.find_objects(components), start=1):
        # Mean column of the component, computed inside its bounding box only.
        columns = np.nonzero(components[bounds] == component_id)[2] + bounds[2].start
        if columns.mean() < midline:  # model columns grow toward the patient's left
            right_ids.append(component_id)
    right = np.isin(components, right_ids)
    return right, kidneys & ~right


def _body_midline_column(hu: np.ndarray) -> float:
    """Mean column of the voxels denser than air; the image centre if there are none."""
    per_column = np.zeros(hu.shape[2])
    for slice_hu in hu:  # per slice, to avoid a full-volume temporary
        per_column += np.count_nonzero(slice_hu > _BODY_HU, axis=0)
    total = per_column.sum()
    if total == 0:
        return (hu.shape[2] - 1) / 2.0
    return float((per_column * np.arange(hu.shape[2])).sum() / total)


def mask_stats(mask: np.ndarray) -> dict[str, list]:
    """Per-slice pixel counts, boxes and box areas (upstream's, no +1) of a mask [S, R, C]."""
    from SlicerMiniGPTPancreas.geometry import mask_box

    pixels = mask.sum(axis=(1, 2)).astype(int).tolist()  # [S]
    boxes, areas = [], []
    for s, count in enumerate(pixels):
        box = mask_box(mask[s]) if count else None
        box = [int(v) for v in box] if box is not None else [0, 0, 0, 0]
        boxes.append(box)
        areas.append((box[2] - box[0]) * (box[3] - box[1]))
    return {"pixels": pixels, "boxes": boxes, "areas": areas}


def _ratio(value: int, maximum: int) -> float:
    return round(value / maximum, 2) if maximum else 0.0


def volume_records(dataset: str, volume_name: str, shape: tuple[int, int, int],
                   stats: dict[str, dict[str, list]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per model-view slice of a volume of model-view `shape` (S, R, C): upstream's keys in
    upstream's order, then `extra[s]`. `slice_id` stays None until the run numbers all volumes."""
    slice_count, height, width = shape
    maxima = {name: (max(values["pixels"]), max(values["areas"])) for name, values in stats.items()}
    records = []
    for s in range(slice_count):
        record: dict[str, Any] = {"dataset": UPSTREAM_DATASET[dataset], "volume_name": volume_name,
                                  "slice_id": None, "slice_index": s, "slice_count": slice_count}
        for name, values in stats.items():
            record[f"pixels_{name}"] = values["pixels"][s]
            record[f"{name}_pixels_ratio"] = _ratio(values["pixels"][s], maxima[name][0])
            record[f"max_pixels_{name}"] = maxima[name][0]
        for name, values in stats.items():
            record[f"bbox_{name}"] = values["boxes"][s]
            record[f"{name}_bbox_ratio"] = _ratio(values["areas"][s], maxima[name][1])
            record[f"max_bbox_{name}"] = maxima[name][1]
        record["width"], record["height"] = width, height
        record.update(extra[s])
        records.append(record)
    return records
