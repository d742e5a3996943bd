"""Boxes on model-view slices -> thin, locked `vtkMRMLMarkupsROINode`s in world RAS, grouped per run.

Each (slice, box) becomes one ROI exactly one slice thick, centred on its slice: slice views draw a ROI as its
intersection with the slice plane, so the box shows on its own axial slice only. Centre and size come from
`ModelView.box_to_ras` (the pixels' full extent, half-voxel borders included). ROIs are locked and their handles
are not interactive: they record what the model said; unlock them in the Markups module to edit.

A run's ROIs go under one subject-hierarchy folder (next to the volume, in its study when it has one). Where the
scene has no subject hierarchy, the run's title is put in front of every ROI name instead. With `add_fused_roi`, one
more ROI encloses all the run's boxes in 3D. The ROIs live in world RAS and are not under any transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.geometry import Box, ModelView

ATTRIBUTE_PREFIX = "MiniGPTPancreas."
RUN_ATTRIBUTE = ATTRIBUTE_PREFIX + "run"  # run number, on every ROI and folder of a run
DEFAULT_COLOR = (1.0, 0.5, 0.0)  # orange, as SlicerMiniGPTPancreas.markups writes .mrk.json files
FUSED_COLOR = (1.0, 0.85, 0.0)


@dataclass(frozen=True)
class PlacedBox:
    """One answer box: its model-view slice, pixel box (x_min, y_min, x_max, y_max), confidence and label."""

    slice_index: int
    box: Box
    confidence: float | None = None
    label: str | None = None


@dataclass
class RoiRun:
    """The nodes one run created. `folder_item` is the subject-hierarchy folder (None without a hierarchy)."""

    number: int
    title: str
    rois: list[Any] = field(default_factory=list)
    fused: Any = None
    folder_item: int | None = None


def roi_name(box: PlacedBox, default_label: str) -> str:
    """'pancreas s42 (0.87)': label, model-view slice, confidence when known."""
    name = f"{box.label or default_label} s{box.slice_index}"
    return name if box.confidence is None else f"{name} ({box.confidence:.2f})"


def add_box_rois(scene: Any, view: ModelView, boxes: Sequence[PlacedBox], *, label: str, volume_node: Any = None,
                 add_fused_roi: bool = False, color: Sequence[float] = DEFAULT_COLOR) -> RoiRun:
    """Add one thin ROI per box (and optionally the fused 3D ROI) to `scene`; return what was created.

    view: the model view of the volume in WORLD RAS (volume_geometry.model_view_geometry).
    label: the name part for boxes without their own label ("pancreas"); it also titles the run.
    volume_node: puts the run's folder next to this volume in the subject hierarchy.
    """
    number = _next_run_number(scene)
    run = RoiRun(number, f"MiniGPT-Pancreas run {number}: {label}")
    sh_node = _subject_hierarchy(scene)
    if sh_node is not None:
        run.folder_item = sh_node.CreateFolderItem(_parent_item(sh_node, volume_node), run.title)
        sh_node.SetItemAttribute(run.folder_item, RUN_ATTRIBUTE, str(number))
    prefix = "" if sh_node is not None else f"{run.title} / "
    corners = []  # [2, 3] world RAS corner pairs of every box
    for box in boxes:
        center, size = view.box_to_ras(box.box, box.slice_index)
        corners.append(view.box_to_ras_corners(box.box, box.slice_index))
        roi = _add_roi(scene, prefix + roi_name(box, label), center, size, color, number)
        roi.SetAttribute(ATTRIBUTE_PREFIX + "slice", str(box.slice_index))
        roi.SetAttribute(ATTRIBUTE_PREFIX + "box", " ".join(f"{v:g}" for v in box.box))
        if box.confidence is not None:
            roi.SetAttribute(ATTRIBUTE_PREFIX + "confidence", f"{box.confidence:.4f}")
        roi.SetDescription(f"MiniGPT-Pancreas box on model-view slice {box.slice_index} (pixels x {box.box[0]:g}-"
                           f"{box.box[2]:g}, y {box.box[1]:g}-{box.box[3]:g}); {run.title}")
        run.rois.append(roi)
    if add_fused_roi and corners:
        all_corners = np.concatenate(corners)  # [2 * N, 3]
        low, high = all_corners.min(axis=0), all_corners.max(axis=0)
        slices = sorted({box.slice_index for box in boxes})
        name = f"{prefix}{label} 3D (slices {slices[0]}-{slices[-1]}, {len(boxes)} boxes)"
        run.fused = _add_roi(scene, name, (low + high) / 2.0, high - low, FUSED_COLOR, number)
        run.fused.SetAttribute(ATTRIBUTE_PREFIX + "fused", "1")
    if sh_node is not None:
        for node in run.rois + ([run.fused] if run.fused is not None else []):
            _move_under(sh_node, node, run.folder_item)
    return run


def roi_world_center_and_size(roi: Any) -> tuple[np.ndarray, np.ndarray]:
    """(center [3], size [3]) of an axis-aligned ROI in world RAS mm, read back from its world bounds."""
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)  # world coordinates: xmin, xmax, ymin, ymax, zmin, zmax
    low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
    return (low + high) / 2.0, high - low


def _add_roi(scene: Any, name: str, center: np.ndarray, size: np.ndarray, color: Sequence[float], run: int) -> Any:
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetName(name)  # AddNewNodeByClass may only use it as a base name
    roi.SetCenter(*(float(v) for v in center))
    roi.SetSize(*(float(v) for v in size))
    roi.SetLocked(True)
    roi.SetAttribute(RUN_ATTRIBUTE, str(run))
    roi.CreateDefaultDisplayNodes()
    display = roi.GetDisplayNode()
    if display is not None:
        display.SetHandlesInteractive(False)
        display.SetColor(*color)
        display.SetSelectedColor(*color)  # ROIs are drawn in the selected colour by default
        display.SetFillOpacity(0.1)
        display.SetPropertiesLabelVisibility(True)  # the name next to the box
        display.SetPointLabelsVisibility(False)
    return roi


def _next_run_number(scene: Any) -> int:
    """One more than the highest run number on any ROI already in the scene."""
    numbers = [0]
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode")):
        value = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsROINode").GetAttribute(RUN_ATTRIBUTE)
        if value and value.isdigit():
            numbers.append(int(value))
    return max(numbers) + 1


def _subject_hierarchy(scene: Any) -> Any:
    """The scene's subject hierarchy node, or None where this MRML build has none."""
    get_node = getattr(scene, "GetSubjectHierarchyNode", None)
    return get_node() if get_node is not None else None


def _parent_item(sh_node: Any, volume_node: Any) -> int:
    """The folder's parent item: the volume's parent (its study) when the volume is in the hierarchy, else the scene."""
    scene_item = sh_node.GetSceneItemID()
    if volume_node is None:
        return scene_item
    volume_item = sh_node.GetItemByDataNode(volume_node)
    parent = sh_node.GetItemParent(volume_item) if volume_item else 0
    return parent if parent else scene_item


def _move_under(sh_node: Any, node: Any, folder_item: int) -> None:
    """Put the node's item under the folder, creating the item where no plugin logic did it on NodeAdded."""
    item = sh_node.GetItemByDataNode(node)
    if item:
        sh_node.SetItemParent(item, folder_item)
    else:
        sh_node.CreateItem(folder_item, node)
