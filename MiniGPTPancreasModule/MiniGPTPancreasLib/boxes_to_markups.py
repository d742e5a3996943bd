"""Boxes on model-view slices -> thin, locked `vtkMRMLMarkupsROINode`s in world RAS, grouped per run.

Each (slice, box) becomes one ROI exactly one slice thick, centred on its slice: slice views draw a ROI as its
intersection with the slice plane, so the box shows on its own axial slice only. Centre and size come from
`ModelView.box_to_ras` (the pixels' full extent, half-voxel borders included). ROIs are locked and their handles
are not interactive: they record what the model said; unlock them in the Markups module to edit. Their name labels
are hidden (a sweep's hundreds of labels would cover the 3D view; the Markups display node has no per-view switch):
the names are in the Data module, the results table and the exported files.

A run's ROIs go under one subject-hierarchy folder (next to the volume, in its study when it has one), which carries
the run's provenance (prompt, model id, server URL, time) as attributes. Where the scene has no subject hierarchy,
the run's title is put in front of every ROI name instead. Run numbers come from a counter kept on the module's
parameter node (saved with the scene), so a number is never given twice, even after its ROIs were deleted. Very
long sweeps are capped at MAX_ROIS_PER_RUN ROIs, the most confident kept (the results table keeps every answer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.geometry import Box, ModelView

ATTRIBUTE_PREFIX = "MiniGPTPancreas."
RUN_ATTRIBUTE = ATTRIBUTE_PREFIX + "run"  # run number, on every ROI, folder and table of a run
LAST_RUN_ATTRIBUTE = ATTRIBUTE_PREFIX + "lastRun"  # on the module's parameter node
MODULE_NAME = "MiniGPTPancreas"
MAX_ROIS_PER_RUN = 500  # beyond this, creating and rendering ROIs makes Slicer sluggish
GREEN = (0.2, 0.8, 0.2)  # ground truth, as in the paper's figures
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
    dropped: int = 0  # boxes not drawn because of MAX_ROIS_PER_RUN


def roi_name(box: PlacedBox, default_label: str) -> str:
    """'pancreas s42 (0.87)': label, model-view slice, confidence when known."""
    name = f"{box.label or default_label} s{box.slice_index}"
    return name if box.confidence is None else f"{name} ({box.confidence:.2f})"


def add_box_rois(scene: Any, view: ModelView, boxes: Sequence[PlacedBox], *, label: str, volume_node: Any = None,
                 color: Sequence[float] = DEFAULT_COLOR, provenance: Mapping[str, str] | None = None,
                 max_rois: int = MAX_ROIS_PER_RUN) -> RoiRun:
    """Add one thin ROI per box to `scene` under a new run folder, in one batch; return what was created.

    view: the model view of the volume in WORLD RAS (volume_geometry.model_view_geometry).
    label: the name part for boxes without their own label ("pancreas"); it also titles the run.
    volume_node: puts the run's folder next to this volume in the subject hierarchy.
    provenance: attributes for the folder (and every ROI), e.g. prompt, model id, server URL, time.
    """
    number = next_run_number(scene)
    run = RoiRun(number, f"MiniGPT-Pancreas run {number}: {label}")
    # The most confident first; a box without a confidence counts as above any threshold (fusion.py), so first too.
    by_confidence = sorted(range(len(boxes)),
                           key=lambda i: -1.0 if boxes[i].confidence is None else -boxes[i].confidence)
    kept = [boxes[i] for i in sorted(by_confidence[:max_rois])]  # in their given order
    run.dropped = len(boxes) - len(kept)
    sh_node = subject_hierarchy(scene)
    scene.StartState(scene.BatchProcessState)  # one scene update for the whole run, not one per ROI
    try:
        if sh_node is not None:
            run.folder_item = sh_node.CreateFolderItem(_parent_item(sh_node, volume_node), run.title)
            sh_node.SetItemAttribute(run.folder_item, RUN_ATTRIBUTE, str(number))
            for key, value in (provenance or {}).items():
                sh_node.SetItemAttribute(run.folder_item, ATTRIBUTE_PREFIX + key, value)
        prefix = "" if sh_node is not None else f"{run.title} / "
        for box in kept:
            run.rois.append(_add_box_roi(scene, view, box, prefix + roi_name(box, label), color, run))
            for key, value in (provenance or {}).items():
                run.rois[-1].SetAttribute(ATTRIBUTE_PREFIX + key, value)
        if sh_node is not None:
            for node in run.rois:
                move_under(sh_node, node, run.folder_item)
    finally:
        scene.EndState(scene.BatchProcessState)
    return run


def next_run_number(scene: Any) -> int:
    """A run number never given before in this scene: above the saved counter and every run attribute present."""
    counter = module_node(scene)
    numbers = [0, int(counter.GetAttribute(LAST_RUN_ATTRIBUTE) or 0)]
    for class_name in ("vtkMRMLMarkupsROINode", "vtkMRMLTableNode"):
        for index in range(scene.GetNumberOfNodesByClass(class_name)):
            value = scene.GetNthNodeByClass(index, class_name).GetAttribute(RUN_ATTRIBUTE)
            numbers.append(int(value) if value and value.isdigit() else 0)
    number = max(numbers) + 1
    counter.SetAttribute(LAST_RUN_ATTRIBUTE, str(number))
    return number


def module_node(scene: Any) -> Any:
    """The module's vtkMRMLScriptedModuleNode in `scene` (created when missing), found as Slicer's logic does."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
        if node.GetAttribute("ModuleName") == MODULE_NAME:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", MODULE_NAME)
    node.SetAttribute("ModuleName", MODULE_NAME)
    return node


def _add_box_roi(scene: Any, view: ModelView, box: PlacedBox, name: str, color: Sequence[float], run: RoiRun) -> Any:
    center, size = view.box_to_ras(box.box, box.slice_index)
    roi = add_roi(scene, name, center, size, color, run.number)
    roi.GetDisplayNode().SetPropertiesLabelVisibility(False)
    roi.SetAttribute(ATTRIBUTE_PREFIX + "slice", str(box.slice_index))
    roi.SetAttribute(ATTRIBUTE_PREFIX + "box", " ".join(f"{v:g}" for v in box.box))
    if box.confidence is not None:
        roi.SetAttribute(ATTRIBUTE_PREFIX + "confidence", f"{box.confidence:.4f}")
    roi.SetDescription(f"MiniGPT-Pancreas box on model-view slice {box.slice_index} (pixels x {box.box[0]:g}-"
                       f"{box.box[2]:g}, y {box.box[1]:g}-{box.box[3]:g}); {run.title}")
    return roi


def roi_world_center_and_size(roi: Any) -> tuple[np.ndarray, np.ndarray]:
    """(center [3], size [3]) of an axis-aligned ROI in world RAS mm, read back from its world bounds."""
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)  # world coordinates: xmin, xmax, ymin, ymax, zmin, zmax
    low, high = np.array(bounds[0::2]), np.array(bounds[1::2])
    return (low + high) / 2.0, high - low


def add_roi(scene: Any, name: str, center: np.ndarray, size: np.ndarray, color: Sequence[float], run: int) -> Any:
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
        display.SetPropertiesLabelVisibility(True)  # the name next to the box (per-slice boxes turn it off)
        display.SetPointLabelsVisibility(False)
    return roi


def subject_hierarchy(scene: Any) -> Any:
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


def move_under(sh_node: Any, node: Any, folder_item: int) -> None:
    """Put the node's item under the folder, creating the item where no plugin logic did it on NodeAdded."""
    item = sh_node.GetItemByDataNode(node)
    if item:
        sh_node.SetItemParent(item, folder_item)
    else:
        sh_node.CreateItem(folder_item, node)
