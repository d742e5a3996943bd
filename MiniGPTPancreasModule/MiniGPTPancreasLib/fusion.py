"""Confidence threshold and the fused 3D box of a run, on the ROIs already in the scene.

A sweep answers slice by slice, and a single confident box on a far slice (an outlier) would stretch a box around
"all boxes" over half the abdomen. The fused ROI therefore encloses only the boxes of the largest run of consecutive
slices that have a box at or above the threshold. Boxes below the threshold are hidden, never deleted: moving the
slider back shows them again. Boxes without a confidence count as above any threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .boxes_to_markups import (ATTRIBUTE_PREFIX, FUSED_COLOR, RUN_ATTRIBUTE, add_roi, move_under,
                               roi_world_center_and_size, subject_hierarchy)

FUSED_ATTRIBUTE = ATTRIBUTE_PREFIX + "fused"
CONFIDENCE_ATTRIBUTE = ATTRIBUTE_PREFIX + "confidence"
SLICE_ATTRIBUTE = ATTRIBUTE_PREFIX + "slice"


def largest_consecutive_run(slices: Iterable[int]) -> list[int]:
    """The longest run of consecutive slice numbers (the lowest one on a tie); [] for none."""
    best: list[int] = []
    current: list[int] = []
    for s in sorted(set(slices)):
        current = current + [s] if current and s == current[-1] + 1 else [s]
        if len(current) > len(best):
            best = current
    return best


def run_rois(scene: Any, run_number: int) -> tuple[list[Any], Any]:
    """(the per-slice ROIs, the fused ROI or None) of run `run_number` in the scene."""
    boxes, fused = [], None
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")):
        roi = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsROINode")
        if roi.GetAttribute(RUN_ATTRIBUTE) != str(run_number):
            continue
        if roi.GetAttribute(FUSED_ATTRIBUTE):
            fused = roi
        elif roi.GetAttribute(SLICE_ATTRIBUTE) is not None:
            boxes.append(roi)
    return boxes, fused


def shown_at(confidence: float | None, threshold: float) -> bool:
    """Whether a box of this confidence is shown at `threshold`."""
    return confidence is None or confidence >= threshold


def above_threshold(roi: Any, threshold: float) -> bool:
    confidence = roi.GetAttribute(CONFIDENCE_ATTRIBUTE)
    return shown_at(None if confidence is None else float(confidence), threshold)


def apply_threshold(scene: Any, run_number: int, threshold: float, label: str) -> Any:
    """Show the run's boxes at or above `threshold`, hide the others, and (re)place the fused ROI around the largest
    run of consecutive slices with a shown box. Returns the fused ROI (None when no box is shown)."""
    boxes, fused = run_rois(scene, run_number)
    shown = [roi for roi in boxes if above_threshold(roi, threshold)]
    for roi in boxes:
        roi.SetDisplayVisibility(roi in shown)
    slices = largest_consecutive_run(int(roi.GetAttribute(SLICE_ATTRIBUTE)) for roi in shown)
    members = [roi for roi in shown if int(roi.GetAttribute(SLICE_ATTRIBUTE)) in slices]
    if not members:
        if fused is not None:
            fused.SetDisplayVisibility(False)
        return None
    low, high = _enclosing_bounds(members)
    name = f"{label} 3D (slices {slices[0]}-{slices[-1]}, {len(members)} boxes >= {threshold:.2f})"
    if fused is None:
        fused = add_roi(scene, name, (low + high) / 2.0, high - low, FUSED_COLOR, run_number)
        fused.SetAttribute(FUSED_ATTRIBUTE, "1")
        _file_with(scene, fused, members[0])
    else:
        fused.SetName(name)
        fused.SetCenter(*((low + high) / 2.0))
        fused.SetSize(*(high - low))
        fused.SetDisplayVisibility(True)
    fused.SetAttribute(ATTRIBUTE_PREFIX + "fusedSlices", f"{slices[0]}-{slices[-1]}")
    fused.SetAttribute(ATTRIBUTE_PREFIX + "threshold", f"{threshold:.4f}")
    return fused


def _file_with(scene: Any, node: Any, sibling: Any) -> None:
    """Put `node` in the subject-hierarchy folder that holds `sibling` (the run's folder)."""
    sh_node = subject_hierarchy(scene)
    if sh_node is not None:
        folder = sh_node.GetItemParent(sh_node.GetItemByDataNode(sibling))
        if folder:
            move_under(sh_node, node, folder)


def _enclosing_bounds(rois: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    lows, highs = [], []
    for roi in rois:
        center, size = roi_world_center_and_size(roi)
        lows.append(center - size / 2.0)
        highs.append(center + size / 2.0)
    return np.min(lows, axis=0), np.max(highs, axis=0)
