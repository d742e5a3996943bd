"""The files of a cascade sweep (`minigpt-pancreas predict --cascade`, `minigpt-pancreas demo`).

Same files as a one-question `predict` (boxes.csv, boxes.mrk.json, answers.json, overlays/, summary.json), with
every slice's three answers: the pancreas box, the tumour yes/no answer with P(yes), and the tumour box where the
answer was yes. Boxes are named "pancreas s<N>" and "tumour s<N>"; overlays draw pancreas boxes in red, tumour
boxes in orange and, when the truth is known (the demo), the true boxes in green.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from backend.cascade_sweep import QUESTIONS, CascadeAnswers
from backend.commands.predict_outputs import COORDINATES, BoxRecord, box_records, write_box_files, write_json
from SlicerMiniGPTPancreas import geometry, preprocess

TUMOUR_COLOR = (255, 150, 0)
Box = tuple[float, float, float, float]


def write_cascade_outputs(folder: Path, view: geometry.ModelView, slices: Sequence[int],
                          answers: Sequence[CascadeAnswers], *, details: dict, seconds: float,
                          truth: Mapping[int, Sequence[Box]] | None = None) -> dict:
    """Write every output file into `folder` and return the summary (also written as summary.json).
    truth: {slice: true boxes} to draw in green on the overlays (the demo knows them)."""
    pancreas = box_records(view, [(s, a.pancreas) for s, a in zip(slices, answers)], "pancreas")
    tumour = box_records(view, [(s, a.tumour) for s, a in zip(slices, answers) if a.tumour is not None], "tumour")
    write_box_files(folder, pancreas + tumour, details["model"])
    write_json(folder / "answers.json", {
        "model": details["model"], "questions": QUESTIONS,
        "slices": [{"slice": s, "pancreas": asdict(a.pancreas), "tumour_yes_no": asdict(a.tumour_yes_no),
                    "tumour": asdict(a.tumour) if a.tumour is not None else None} for s, a in zip(slices, answers)]})
    overlays = _write_overlays(folder / "overlays", view, pancreas, tumour, truth or {}, details["image_variant"])
    summary = {
        **details,
        "questions": QUESTIONS,
        "model_view_shape": list(view.shape),
        "spacing_mm": list(view.spacing),
        "slices": {"first": min(slices, default=None), "last": max(slices, default=None), "count": len(slices)},
        "pancreas_boxes": len(pancreas),
        "tumour_yes": sum(a.tumour_said for a in answers),
        "tumour_boxes": len(tumour),
        "seconds": round(seconds, 3),
        "coordinates": COORDINATES,
        "files": ["boxes.csv", "boxes.mrk.json", "answers.json", f"overlays/ ({len(overlays)} PNG)", "summary.json"],
    }
    write_json(folder / "summary.json", summary)
    return summary


def _write_overlays(folder: Path, view: geometry.ModelView, pancreas: list[BoxRecord], tumour: list[BoxRecord],
                    truth: Mapping[int, Sequence[Box]], variant: str) -> list[str]:
    """One PNG per slice with a predicted or a true box: truth green, pancreas red, tumour orange."""
    from backend.overlays import PREDICTION_COLOR, TRUTH_COLOR, OverlayBox, draw_overlay

    folder.mkdir()
    digits = len(str(view.shape[0] - 1))
    names = []
    for s in sorted({r.slice for r in pancreas + tumour} | set(truth)):
        boxes = [OverlayBox(box, TRUTH_COLOR) for box in truth.get(s, ())]
        boxes += [OverlayBox(r.box, PREDICTION_COLOR, f"P {r.confidence:.2f}") for r in pancreas if r.slice == s]
        boxes += [OverlayBox(r.box, TUMOUR_COLOR, f"T {r.confidence:.2f}") for r in tumour if r.slice == s]
        rgb = preprocess.hu_slice_to_rgb(np.asarray(view.slice(s)), variant=variant)  # [R, C, 3] uint8
        name = f"slice_{s:0{digits}d}.png"
        draw_overlay(rgb, boxes).save(folder / name)
        names.append(name)
    return names
