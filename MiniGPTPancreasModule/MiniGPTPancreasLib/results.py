"""What a run leaves behind: its provenance, a results table (every answer, yes/no and P(yes) included) and an
export of the run as `.mrk.json` (Slicer's markups file: File > Add Data) plus CSV.

The table is a vtkMRMLTableNode saved with the scene, one row per answered slice, carrying the run number like the
run's ROIs; the CSV is that table with the provenance repeated on every row, so that each file stands alone.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import vtk

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.atomic import atomic_write
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import ModelView
from SlicerMiniGPTPancreas.markups import RoiMarkup, write_roi_markups

from .boxes_to_markups import ATTRIBUTE_PREFIX, RUN_ATTRIBUTE, roi_world_center_and_size
from .fusion import run_rois
from .volume_geometry import slicer_slice_label

COLUMNS = ("slice", "in Slicer", "answer", "kind", "yes", "P(yes)", "boxes", "confidences")
PROVENANCE_KEYS = ("prompt", "modelId", "serverUrl", "time")


class ExportError(UserError, ValueError):
    """A run cannot be exported (unknown run, folder missing or not writable); the message says what to do."""


def provenance(prompt: str, model_id: str, server_url: str, when: datetime | None = None) -> dict[str, str]:
    """The attributes every run records: what was asked, which model answered, where, when (UTC, ISO 8601)."""
    moment = (when or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return dict(zip(PROVENANCE_KEYS, (prompt, model_id, server_url, moment)))


def write_results_table(scene: Any, view: ModelView, run_number: int, title: str,
                        responses: Mapping[int, p.QueryResponse], run_provenance: Mapping[str, str]) -> Any:
    """A new table node '<title> results': one row per answered slice, in slice order."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} results")
    table_node.SetName(f"{title} results")
    table_node.SetAttribute(RUN_ATTRIBUTE, str(run_number))
    for key, value in run_provenance.items():
        table_node.SetAttribute(ATTRIBUTE_PREFIX + key, value)
    table = table_node.GetTable()
    for name in COLUMNS:
        column = vtk.vtkDoubleArray() if name in ("slice", "P(yes)") else vtk.vtkStringArray()
        column.SetName(name)
        table.AddColumn(column)
    for s, response in sorted(responses.items()):
        row = table.InsertNextBlankRow()
        for column, value in enumerate(_row_values(view, s, response)):
            table.SetValue(row, column, vtk.vtkVariant(value))
    table_node.SetColumnDescription("slice", "Model-view slice (axial, counted from inferior to superior)")
    table_node.SetColumnDescription("in Slicer", "The same slice as Slicer shows it: voxel K (Data Probe), S offset")
    table_node.SetColumnDescription("P(yes)", "Probability of 'yes' read from the model's logits (yes/no questions)")
    table_node.Modified()
    return table_node


def results_table(scene: Any, run_number: int) -> Any:
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLTableNode")
        if node.GetAttribute(RUN_ATTRIBUTE) == str(run_number):
            return node
    return None


def export_run(scene: Any, run_number: int, folder: str | Path) -> tuple[Path, Path]:
    """Write run `run_number` as <folder>/minigpt_pancreas_run_<N>.mrk.json (its ROIs) and .csv (its table)."""
    table = results_table(scene, run_number)
    if table is None:
        raise ExportError(f"There is no MiniGPT-Pancreas run {run_number} in the scene; pick a run that exists.")
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"The export folder {folder} does not exist; choose an existing folder.")
    boxes, fused = run_rois(scene, run_number)
    rois = [RoiMarkup(*roi_world_center_and_size(roi), roi.GetName(), roi.GetDescription() or "")
            for roi in boxes + ([fused] if fused is not None else [])]
    stem = folder / f"minigpt_pancreas_run_{run_number}"
    text = _table_csv(table)
    try:
        markups = write_roi_markups(stem.with_suffix(".mrk.json"), rois)
        table_csv = atomic_write(stem.with_suffix(".csv"), lambda path: path.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise ExportError(f"Cannot write to {folder}: {error}. Choose a folder you can write to.") from error
    return markups, table_csv


def _row_values(view: ModelView, s: int, response: p.QueryResponse) -> tuple:
    yes = "" if response.yes is None else ("yes" if response.yes else "no")
    probability = math.nan if response.yes_probability is None else response.yes_probability
    boxes = "; ".join(" ".join(f"{v:g}" for v in box.box) for box in response.boxes)
    confidences = "; ".join("" if box.confidence is None else f"{box.confidence:.4f}" for box in response.boxes)
    return float(s), slicer_slice_label(view, s), response.answer, response.kind, yes, probability, boxes, confidences


def _table_csv(table_node: Any) -> str:
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    extra = [(key, table_node.GetAttribute(ATTRIBUTE_PREFIX + key) or "") for key in PROVENANCE_KEYS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names + [key for key, _ in extra])
    for row in range(table.GetNumberOfRows()):
        values = [_csv_value(table.GetValue(row, column)) for column in range(len(names))]
        writer.writerow(values + [value for _, value in extra])
    return out.getvalue()


def _csv_value(variant: vtk.vtkVariant) -> str:
    if variant.IsString():
        return variant.ToString()
    number = variant.ToDouble()
    return "" if math.isnan(number) else f"{number:g}"
