"""3D Slicer Markups JSON (`.mrk.json`) files holding box ROIs, written without Slicer.

A file holds one or more ROI markups of type "Box", axis-aligned with the patient axes, in Slicer's markups schema
v1.0.3 (the `@schema` Slicer's own writer stamps; Slicer 5 reads every v1.x). Coordinates are stored in LPS
millimetres, as Slicer writes them; callers give RAS (Slicer's world frame) and the conversion happens here.

Loading: File > Add Data (or `slicer.util.loadMarkups`) creates one `vtkMRMLMarkupsROINode` per markup in the
file, each keeping its name. Slicer places a box ROI at its control point and sizes it from "size", so every ROI
carries one control point at its centre (a ROI without one loads with size 0). A markup-level description is not
read by Slicer; the description is stored on that control point, where the Markups module shows it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from SlicerMiniGPTPancreas.atomic import atomic_write
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import LPS_TO_RAS

SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
DEFAULT_COLOR = (1.0, 0.5, 0.0)  # orange: stands out from Slicer's default cyan/green markups and from CT greys
# Identity ROI axes (R, A, S) written in LPS, row-major: the RAS -> LPS flip itself (it is its own inverse).
_IDENTITY_ORIENTATION_LPS = LPS_TO_RAS.ravel().tolist()


class MarkupsError(UserError, ValueError):
    """A ROI cannot be written (non-finite or negative numbers, empty name) or the file cannot be written."""


class RoiMarkup(NamedTuple):
    """An axis-aligned box ROI in Slicer's world frame. Plain (center, size, name, description) tuples also work."""

    center_ras: Sequence[float]  # [3] mm
    size_mm: Sequence[float]  # [3] mm along R, A, S (full edge lengths, not half-sizes)
    name: str
    description: str = ""


def roi_markup(roi: RoiMarkup | Sequence, *, color: Sequence[float] = DEFAULT_COLOR, locked: bool = True) -> dict:
    """One ROI entry of the file's "markups" array (coordinates converted RAS -> LPS).

    locked: Slicer refuses to move or resize locked markups with the mouse (unlock in the Markups module);
    predictions are kept as predicted unless the user chooses to edit them.
    """
    center_ras, size_mm, name, description = _checked_roi(roi)
    center_lps = (LPS_TO_RAS @ np.array(center_ras)).tolist()
    rgb = _checked_color(color)
    return {
        "type": "ROI",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": bool(locked),
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "roiType": "Box",
        "center": center_lps,
        "orientation": list(_IDENTITY_ORIENTATION_LPS),
        "size": list(size_mm),
        "controlPoints": [{
            "id": "1",
            "label": name,
            "description": description,
            "associatedNodeID": "",
            "position": list(center_lps),
            "orientation": list(_IDENTITY_ORIENTATION_LPS),
            "selected": True,
            "locked": bool(locked),
            "visibility": True,
            "positionStatus": "defined",
        }],
        "measurements": [],
        "display": {
            "visibility": True,
            "opacity": 1.0,
            "color": rgb,
            "selectedColor": rgb,  # a selected control point (the default) draws the ROI in this colour
            "activeColor": [0.4, 1.0, 0.0],
            "propertiesLabelVisibility": True,  # the name next to the box
            "pointLabelsVisibility": False,
            "textScale": 2.0,
            "handlesInteractive": False,
        },
    }


def markups_document(rois: Iterable[RoiMarkup | Sequence], *, color: Sequence[float] = DEFAULT_COLOR,
                     locked: bool = True) -> dict:
    """The whole `.mrk.json` document: {"@schema": ..., "markups": [one ROI per item]}."""
    return {"@schema": SCHEMA_URL, "markups": [roi_markup(roi, color=color, locked=locked) for roi in rois]}


def write_roi_markups(path: str | os.PathLike, rois: Iterable[RoiMarkup | Sequence], *,
                      color: Sequence[float] = DEFAULT_COLOR, locked: bool = True) -> Path:
    """Write the ROIs as one `.mrk.json` file, atomically (a temporary file in the same folder, then renamed).

    Every ROI is checked before anything is written; an empty `rois` gives a valid file with no markups.
    The folder must exist (MarkupsError otherwise).
    """
    target = Path(path)
    text = json.dumps(markups_document(rois, color=color, locked=locked), indent=2) + "\n"
    try:
        return atomic_write(target, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise MarkupsError(f"cannot write {target}: {error}. Check that the folder exists and is writable.") from error


def _checked_roi(roi: RoiMarkup | Sequence) -> tuple[list[float], list[float], str, str]:
    if not 3 <= len(roi) <= 4:
        raise MarkupsError(f"A ROI is (center_ras, size_mm, name[, description]), got {roi!r}.")
    center, size, name = roi[0], roi[1], roi[2]
    description = roi[3] if len(roi) == 4 else ""
    center_ras = _finite_triple("center_ras", center, name)
    size_mm = _finite_triple("size_mm", size, name)
    if min(size_mm) < 0:
        raise MarkupsError(f"ROI {name!r}: size_mm must not be negative, got {size_mm}.")
    if not isinstance(name, str) or not name.strip():
        raise MarkupsError(f"A ROI needs a non-empty name (shown in Slicer's data tree), got {name!r}.")
    if not isinstance(description, str):
        raise MarkupsError(f"ROI {name!r}: description must be a string, got {description!r}.")
    return center_ras, size_mm, name, description


def _finite_triple(what: str, values: Sequence[float], name: object) -> list[float]:
    try:
        triple = [float(v) for v in values]
    except (TypeError, ValueError):
        triple = []
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise MarkupsError(f"ROI {name!r}: {what} must be three finite millimetre values, got {values!r}.")
    return triple


def _checked_color(color: Sequence[float]) -> list[float]:
    rgb = [float(v) for v in color]
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise MarkupsError(f"color must be three values between 0 and 1 (red, green, blue), got {color!r}.")
    return rgb
