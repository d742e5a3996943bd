"""Ground truth from a segmentation or label map -> a truth box per model-view slice -> IoU per slice in a table.

The truth mask is taken on the CT volume's own voxel grid, so truth boxes and predicted boxes share one pixel frame:
a label map on the same grid is read directly; a segmentation, or a label map on another grid (or under another
transform), is resampled onto the CT grid by Slicer's segmentation logic (nearest neighbour, transforms included).
A slice's truth box is the inclusive box of all its mask pixels (upstream's get_bbox); its predicted box is the box
enclosing every box the model gave for that slice. IoU uses upstream's "+1" convention (inclusive pixel counts),
which is the IoU of the boxes' pixel extents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk
from slicer.util import arrayFromVolume

from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import Box, ModelView
from SlicerMiniGPTPancreas.metrics import box_iou

from .boxes_to_markups import GREEN, PlacedBox, RoiRun, add_box_rois
from .volume_geometry import model_view_geometry, volume_array_and_matrix, world_ijk_to_ras

GRID_TOLERANCE_MM = 1e-3
COLUMNS = ("slice", "predicted box", "truth box", "IoU")


class GroundTruthError(UserError, ValueError):
    """The truth node or the chosen labels/segments cannot give a mask (the message says what to choose)."""


@dataclass(frozen=True)
class SliceComparison:
    """One model-view slice: the predicted and truth boxes (None = none) and their IoU (None when both are absent)."""

    slice_index: int
    predicted: Box | None
    truth: Box | None
    iou: float | None


@dataclass(frozen=True)
class Comparison:
    rows: list[SliceComparison]
    mean_iou: float | None
    table_node: Any
    plot_chart_node: Any = None
    truth_run: RoiRun | None = None  # the truth boxes, drawn in green
    threshold: float | None = None  # only boxes at or above it were compared (None: every box given)


def truth_mask(truth_node: Any, volume_node: Any, *, label_values: Sequence[int] | None = None,
               segment_ids: Sequence[str] | None = None) -> np.ndarray:
    """bool [K, J, I] on the volume's voxel grid: voxels whose label is in `label_values` (label map; None = any
    nonzero label), or inside any of `segment_ids` (segmentation; None = every segment)."""
    if truth_node is None:
        raise GroundTruthError("No ground truth is selected. Choose a segmentation or a label map volume.")
    if truth_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return _labelmap_mask(truth_node, volume_node, label_values)
    if truth_node.IsA("vtkMRMLSegmentationNode"):
        return _segments_on_volume_grid(truth_node, volume_node, segment_ids)
    raise GroundTruthError(f"'{truth_node.GetName()}' is a {truth_node.GetClassName()}; ground truth must be a "
                           "segmentation or a label map volume.")


def truth_choices(truth_node: Any) -> list[tuple[str, dict[str, Any]]]:
    """The structures a user can compare with, as (title, keyword arguments of `truth_mask`): everything first, then
    each segment of a segmentation or each label value present in a label map (named from its colour table)."""
    if truth_node is None:
        return []
    if truth_node.IsA("vtkMRMLSegmentationNode"):
        segmentation = truth_node.GetSegmentation()
        return [("All segments", {})] + [
            (segmentation.GetNthSegment(i).GetName(), {"segment_ids": [segmentation.GetNthSegmentID(i)]})
            for i in range(segmentation.GetNumberOfSegments())]
    display = truth_node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    choices = [("All labels (nonzero)", {})]
    for value in np.unique(arrayFromVolume(truth_node)):
        name = colors.GetColorName(int(value)) if colors is not None else ""
        title = f"Label {int(value)}" + (f" ({name})" if name and name != "(none)" else "")
        choices += [] if value == 0 else [(title, {"label_values": [int(value)]})]
    return choices


def truth_boxes(mask_kji: np.ndarray, ijk_to_ras: np.ndarray) -> dict[int, Box]:
    """{model-view slice: inclusive truth box} for every slice where the mask [K, J, I] has voxels."""
    view = ModelView.from_volume(mask_kji, ijk_to_ras).array  # [S, R, C]
    rows_hit = view.any(axis=2)  # [S, R]
    cols_hit = view.any(axis=1)  # [S, C]
    boxes = {}
    for s in np.flatnonzero(rows_hit.any(axis=1)):
        rows, cols = np.flatnonzero(rows_hit[s]), np.flatnonzero(cols_hit[s])
        boxes[int(s)] = (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))
    return boxes


def compare_boxes(predictions: Mapping[int, Sequence[Box]], truths: Mapping[int, Box]) -> list[SliceComparison]:
    """One row per predicted slice (its key; an empty list = the model found nothing there), in slice order."""
    rows = []
    for s in sorted(predictions):
        predicted = enclosing_box(predictions[s])
        truth = truths.get(s)
        if predicted is None and truth is None:
            iou = None
        elif predicted is None or truth is None:
            iou = 0.0
        else:
            iou = box_iou(predicted, truth, convention="plus_one")
        rows.append(SliceComparison(int(s), predicted, truth, iou))
    return rows


def mean_iou(rows: Sequence[SliceComparison]) -> float | None:
    """Mean IoU over the slices where the prediction or the truth has a box (None when there is no such slice)."""
    scored = [row.iou for row in rows if row.iou is not None]
    return sum(scored) / len(scored) if scored else None


def enclosing_box(boxes: Sequence[Box]) -> Box | None:
    """The smallest box holding all `boxes`; None for no boxes."""
    if not boxes:
        return None
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (float(array[:, 0].min()), float(array[:, 1].min()), float(array[:, 2].max()), float(array[:, 3].max()))


def write_comparison_table(scene: Any, rows: Sequence[SliceComparison], name: str, kept: str = "") -> Any:
    """A new vtkMRMLTableNode: one row per slice (slice, predicted box, truth box, IoU) and a last "mean" row, whose
    text ends with `kept` (which predicted boxes were compared, e.g. ", boxes >= 0.50").

    IoU is a number column; it holds NaN on slices where neither the model nor the truth has a box.
    """
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table_node.SetName(name)
    table = table_node.GetTable()
    columns = [vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray()]
    for column, title in zip(columns, COLUMNS):
        column.SetName(title)
        table.AddColumn(column)
    for row in rows:
        _append_row(table, str(row.slice_index), _format_box(row.predicted), _format_box(row.truth),
                    math.nan if row.iou is None else row.iou)
    mean = mean_iou(rows)
    scored = sum(row.iou is not None for row in rows)
    _append_row(table, "mean", "", f"over {scored} slices with a box{kept}", math.nan if mean is None else mean)
    table_node.SetColumnDescription("IoU", "Box IoU, upstream +1 convention (inclusive pixels); empty where neither "
                                           "the model nor the truth has a box")
    table_node.SetColumnDescription("slice", "Model-view slice (axial, counted from inferior to superior)")
    table_node.Modified()
    return table_node


def write_iou_plot(scene: Any, rows: Sequence[SliceComparison], name: str) -> Any:
    """A plot chart node 'IoU by slice': IoU (y, 0-1) over model-view slice (x), one point per scored slice.

    Its data lives in a numeric table of its own (the comparison table's slice column also holds "mean").
    """
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} data")
    table_node.SetName(f"{name} data")
    table = table_node.GetTable()
    for title in ("slice", "IoU"):
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        table.AddColumn(column)
    for row in rows:
        if row.iou is not None:
            _append_row(table, float(row.slice_index), row.iou)
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "IoU")
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName("slice")
    series.SetYColumnName("IoU")
    series.SetPlotType(series.PlotTypeScatter)
    series.SetMarkerStyle(series.MarkerStyleCircle)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetName(name)
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle("model-view slice (inferior to superior)")
    chart.SetYAxisTitle("IoU")
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(0.0, 1.0)
    chart.SetLegendVisibility(False)
    return chart


def compare_with_truth(scene: Any, volume_node: Any, truth_node: Any, predictions: Mapping[int, Sequence[Box]], *,
                       label_values: Sequence[int] | None = None, segment_ids: Sequence[str] | None = None,
                       table_name: str | None = None, threshold: float | None = None) -> Comparison:
    """IoU per predicted slice against the truth's boxes: a table node, an IoU-by-slice plot chart node and the
    truth boxes of those slices as green ROIs in `scene` (main thread). `threshold`: the confidence the predictions
    were kept at, named in the table and the plot."""
    mask = truth_mask(truth_node, volume_node, label_values=label_values, segment_ids=segment_ids)
    _, matrix = volume_array_and_matrix(volume_node)
    rows = compare_boxes(predictions, truth_boxes(mask, matrix))
    kept = "" if threshold is None else f", boxes >= {threshold:.2f}"
    name = table_name or f"MiniGPT-Pancreas IoU vs {truth_node.GetName()}{kept}"
    table = write_comparison_table(scene, rows, name, kept)
    chart = write_iou_plot(scene, rows, f"{name}: IoU by slice")
    shown = {row.slice_index: row.truth for row in rows if row.truth is not None}
    truth_run = add_box_rois(scene, model_view_geometry(volume_node),
                             [PlacedBox(s, box) for s, box in sorted(shown.items())],
                             label=f"ground truth ({truth_node.GetName()})", volume_node=volume_node, color=GREEN)
    return Comparison(rows, mean_iou(rows), table, chart, truth_run, threshold)


def _append_row(table: vtk.vtkTable, *values: Any) -> None:
    row = table.InsertNextBlankRow()
    for column, value in enumerate(values):
        table.SetValue(row, column, vtk.vtkVariant(value))


def _format_box(box: Box | None) -> str:
    return "none" if box is None else "(" + ", ".join(f"{v:g}" for v in box) + ")"


def _labelmap_mask(labelmap_node: Any, volume_node: Any, label_values: Sequence[int] | None) -> np.ndarray:
    """bool [K, J, I] on the volume's grid: the label map's voxels with a chosen label (None = any nonzero)."""
    volume_array, volume_matrix = volume_array_and_matrix(volume_node)
    labels = arrayFromVolume(labelmap_node)
    if labels.shape == volume_array.shape and np.allclose(world_ijk_to_ras(labelmap_node), volume_matrix,
                                                          atol=GRID_TOLERANCE_MM):
        return labels != 0 if label_values is None else np.isin(labels, np.asarray(list(label_values)))
    # Another grid: one segment per label value, resampled onto the volume's grid by Slicer.
    segmentation_node = _temporary_node(volume_node.GetScene(), "vtkMRMLSegmentationNode")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap_node,
                                                                                         segmentation_node):
            raise GroundTruthError(f"Slicer could not read the label map '{labelmap_node.GetName()}'.")
        segmentation = segmentation_node.GetSegmentation()
        chosen = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
                  if label_values is None or segmentation.GetNthSegment(i).GetLabelValue() in set(label_values)]
        if not chosen:
            return np.zeros(volume_array.shape, dtype=bool)
        return _export_segments(segmentation_node, chosen, volume_node)
    finally:
        volume_node.GetScene().RemoveNode(segmentation_node)


def _segments_on_volume_grid(segmentation_node: Any, volume_node: Any, segment_ids: Sequence[str] | None) -> np.ndarray:
    segmentation = segmentation_node.GetSegmentation()
    known = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not known:
        raise GroundTruthError(f"The segmentation '{segmentation_node.GetName()}' has no segments.")
    chosen = known if segment_ids is None else list(segment_ids)
    missing = [segment_id for segment_id in chosen if segment_id not in known]
    if missing or not chosen:
        names = ", ".join(f"{segmentation.GetSegment(i).GetName()} ({i})" for i in known)
        raise GroundTruthError(f"The segmentation '{segmentation_node.GetName()}' has no segment {missing or '[]'}; "
                               f"it has: {names}.")
    return _export_segments(segmentation_node, chosen, volume_node)


def _export_segments(segmentation_node: Any, segment_ids: Sequence[str], volume_node: Any) -> np.ndarray:
    """bool [K, J, I]: the union of the segments, resampled onto the volume's grid (transforms included)."""
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    labelmap = _temporary_node(volume_node.GetScene(), "vtkMRMLLabelMapVolumeNode")
    try:
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node)
        if not exported or labelmap.GetImageData() is None:
            raise GroundTruthError(f"Slicer could not resample '{segmentation_node.GetName()}' onto the CT volume's "
                                   "grid. Check that the segmentation overlaps the volume.")
        return arrayFromVolume(labelmap) != 0
    finally:
        volume_node.GetScene().RemoveNode(labelmap)


def _temporary_node(scene: Any, class_name: str) -> Any:
    node = scene.AddNewNodeByClass(class_name, "MiniGPT-Pancreas temporary")
    node.SetHideFromEditors(True)
    return node
