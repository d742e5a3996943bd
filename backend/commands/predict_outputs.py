"""The files `minigpt-pancreas predict` writes, from the engine's answers on model-view slices.

Every box is mapped once (`box_records`) from pixels of its model-view slice to patient millimetres with
`ModelView.box_to_ras` (the box's pixel extent, one slice thick), and that one record feeds boxes.csv,
boxes.mrk.json and the overlays, so the three always agree.

The output folder is replaced whole (`atomic.staged_folder`), so `check_output_folder` refuses, before the model
runs, a folder that holds anything these writers did not write, and `writing` turns a failed write (full disk,
read-only file system) into one line for the user.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from SlicerMiniGPTPancreas import geometry, markups, preprocess
from SlicerMiniGPTPancreas.atomic import check_can_stage
from SlicerMiniGPTPancreas.errors import UserError, write_errors_as

OUTPUT_NAMES = frozenset({"answers.json", "boxes.csv", "boxes.mrk.json", "overlays", "summary.json"})
_OVERLAY = re.compile(r"slice_\d+\.png")  # the only files in overlays/

CSV_FIELDS = ("slice", "box", "name", "answer", "x_min", "y_min", "x_max", "y_max", "confidence",
              "center_r", "center_a", "center_s", "size_r", "size_a", "size_s")
COORDINATES = {
    "pixel boxes": "(x_min, y_min, x_max, y_max) index coordinates on the model-view slice (x = column; "
                   "up = anterior, left = patient right), max inclusive",
    "boxes.csv": "RAS millimetres (center and full size of the box's pixel extent, one slice thick)",
    "boxes.mrk.json": "LPS millimetres, as 3D Slicer stores markups (Slicer shows them in RAS)",
    "slice": "model-view slice index, 0 = most inferior",
}


class OutputFolderError(UserError):
    """--out cannot be used or written: it holds the user's files, lies under a file, or a write failed."""


@dataclass(frozen=True)
class BoxRecord:
    """One detected box with its place in the patient."""

    slice: int
    index: int  # 1-based, among the boxes of its slice
    name: str  # e.g. "pancreas s42" ("pancreas s42-2" for the second box of a slice)
    answer: str
    box: tuple[float, float, float, float]  # pixel index coordinates on the model-view slice
    confidence: float
    center_ras: tuple[float, float, float]  # mm
    size_mm: tuple[float, float, float]  # mm along R, A, S


def box_records(view: geometry.ModelView, results: Sequence[tuple[int, object]], label: str) -> list[BoxRecord]:
    """A record per box of every (slice, SliceResult); a box's own phrase ("<p>label</p>") overrides `label`."""
    records = []
    for s, result in results:
        for index, detected in enumerate(result.boxes, start=1):
            center, size = view.box_to_ras(detected.box, s)
            name = f"{detected.label or label} s{s}" + (f"-{index}" if len(result.boxes) > 1 else "")
            records.append(BoxRecord(s, index, name, result.answer, tuple(float(v) for v in detected.box),
                                     float(detected.confidence), tuple(float(v) for v in center),
                                     tuple(float(v) for v in size)))
    return records


def write_outputs(folder: Path, view: geometry.ModelView, results: Sequence[tuple[int, object]], *, label: str,
                  details: dict, seconds: float) -> dict:
    """Write every output file into `folder` (which exists) and return the summary written as summary.json.

    results: (model-view slice, `backend.engine.SliceResult`) pairs in slice order. details: the run's inputs
    (command, volume, prompt, model, device, precision, image_variant, ...), copied into the summary; the model
    id also goes into answers.json and every ROI's description.
    """
    records = box_records(view, results, label)
    model = details["model"]
    write_box_files(folder, records, model)
    answers = [{"slice": s, **asdict(result)} for s, result in results]
    write_json(folder / "answers.json", {"model": model, "prompt": details["prompt"], "slices": answers})
    overlays = _write_overlays(folder / "overlays", view, records, details["image_variant"])
    kinds = Counter(result.kind for _, result in results)
    yes_no = [result.yes for _, result in results if result.yes is not None]
    slices = [s for s, _ in results]
    summary = {
        **details,
        "model_view_shape": list(view.shape),
        "spacing_mm": list(view.spacing),
        "slices": {"first": min(slices, default=None), "last": max(slices, default=None), "count": len(slices)},
        "answers_by_kind": dict(sorted(kinds.items())),
        "boxes": len(records),
        "slices_with_boxes": len({r.slice for r in records}),
        "yes_answers": sum(yes_no) if yes_no else None,
        "seconds": round(seconds, 3),
        "coordinates": COORDINATES,
        "files": ["boxes.csv", "boxes.mrk.json", "answers.json", f"overlays/ ({len(overlays)} PNG)",
                  "summary.json"],
    }
    write_json(folder / "summary.json", summary)
    return summary


def write_box_files(folder: Path, records: list[BoxRecord], model: str) -> None:
    """boxes.csv and boxes.mrk.json (one thin ROI per box, described with the model id and confidence)."""
    _write_csv(folder / "boxes.csv", records)
    markups.write_roi_markups(folder / "boxes.mrk.json", [
        markups.RoiMarkup(r.center_ras, r.size_mm, r.name, f"{model}, confidence {r.confidence:.2f}: {r.answer}")
        for r in records])


def _write_csv(path: Path, records: list[BoxRecord]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_FIELDS)
        for r in records:
            writer.writerow([r.slice, r.index, r.name, r.answer, *(round(v, 3) for v in r.box),
                             round(r.confidence, 4), *(round(v, 3) for v in r.center_ras),
                             *(round(v, 3) for v in r.size_mm)])


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_overlays(folder: Path, view: geometry.ModelView, records: list[BoxRecord], variant: str) -> list[str]:
    """One PNG per slice with boxes: the model's 8-bit view of the slice, its boxes and their confidences."""
    from backend.overlays import PREDICTION_COLOR, OverlayBox

    boxes: dict[int, list] = {}
    for r in records:
        boxes.setdefault(r.slice, []).append(OverlayBox(r.box, PREDICTION_COLOR, f"{r.confidence:.2f}"))
    return write_overlay_pngs(folder, view, boxes, variant)


def write_overlay_pngs(folder: Path, view: geometry.ModelView, boxes_by_slice: dict[int, list],
                       variant: str) -> list[str]:
    """`folder/slice_NN.png` for each slice with boxes: the model's 8-bit view of the slice with its
    `backend.overlays.OverlayBox`es drawn; returns the file names."""
    from backend.overlays import draw_overlay

    folder.mkdir()
    digits = len(str(view.shape[0] - 1))
    names = []
    for s in sorted(boxes_by_slice):
        rgb = preprocess.hu_slice_to_rgb(np.asarray(view.slice(s)), variant=variant)  # [R, C, 3] uint8
        name = f"slice_{s:0{digits}d}.png"
        draw_overlay(rgb, boxes_by_slice[s]).save(folder / name)
        names.append(name)
    return names


def check_output_folder(out: Path, command: str, *, names: Iterable[str] = OUTPUT_NAMES,
                        inputs: Iterable[Path] = ()) -> None:
    """Refuse an `out` that replacing whole would lose something the user keeps, or that cannot be written.

    `out` may be missing, empty, or an earlier output of `command` (its summary.json says so) holding only
    `names` (and slice PNGs in overlays/); `inputs` (the volume) must not lie inside it. Its folder is created
    and a staging folder tried there, so that a file in the way or a read-only disk is found before the model
    runs, not after.
    """
    out = out.absolute()
    blocker = next(p for p in (out, *out.parents) if p.exists())
    if not blocker.is_dir():
        raise OutputFolderError(f"--out {out}: {blocker} is a file, not a folder; choose another --out.")
    for path in inputs:
        if path.resolve().is_relative_to(out.resolve()):
            raise OutputFolderError(f"the input {path} is inside --out {out}, which is replaced whole; choose "
                                    "another --out or move the input out of it.")
    with writing(out):
        if out.is_dir() and any(out.iterdir()):
            _check_replaceable(out, command, frozenset(names))
        check_can_stage(out)


def writing(out: Path):
    """Turn an OSError while reading or writing `out` into an OutputFolderError that says what to do; the
    staging folder is gone by then and an earlier output untouched (`atomic.staged_folder`)."""
    return write_errors_as(OutputFolderError, f"--out {out}", "nothing was written there.")


def _check_replaceable(out: Path, command: str, names: frozenset[str]) -> None:
    foreign = sorted(p.name for p in out.iterdir() if p.name not in names)
    if (out / "overlays").is_dir():
        foreign += sorted(f"overlays/{p.name}" for p in (out / "overlays").iterdir() if not _OVERLAY.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputFolderError(f"--out {out} holds files {command} did not write ({shown}); it is replaced whole, "
                                "so choose another --out or move them out of it.")
    if not _is_earlier_output(out, command):
        raise OutputFolderError(f"--out {out} exists and is not an earlier {command} output (see its summary.json); "
                                "it would be replaced whole, so choose another --out.")


def _is_earlier_output(folder: Path, command: str) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("command") == command
    except (OSError, ValueError, AttributeError):
        return False
