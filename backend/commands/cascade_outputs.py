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

from backend.cascade_sweep import QUESTIONS, CascadeAnswers
from backend.commands.predict_outputs import (COORDINATES, BoxRecord, box_records, write_box_files, write_json,
                                              write_overlay_pngs)
from SlicerMiniGPTPancreas import geometry

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
                    "tumour": asdict(a.tumour) if a.tumour is not None else None, **_close_up(a)}
                   for s, a in zip(slices, answers)]})
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


def _close_up(answers: CascadeAnswers) -> dict:
    """Where the later answers were asked of a close-up: its window [x0, y0, x1, y1) (slice pixels) and the
    whole slice's first pancreas answer. The boxes above are in slice pixels; the answers' words are the model's,
    about the window."""
    if answers.window is None:
        return {}
    return {"close_up": {"window": answers.window.as_list(), "first_look": asdict(answers.first_look)}}


def _write_overlays(folder: Path, view: geometry.ModelView, pancreas: list[BoxRecord], tumour: list[BoxRecord],
                    truth: Mapping[int, Sequence[Box]], variant: str) -> list[str]:
    """One PNG per slice with a predicted or a true box: truth green, pancreas red, tumour orange."""
    from backend.overlays import PREDICTION_COLOR, TRUTH_COLOR, OverlayBox

    boxes: dict[int, list] = {s: [OverlayBox(box, TRUTH_COLOR) for box in true] for s, true in truth.items()}
    for records, color, tag in ((pancreas, PREDICTION_COLOR, "P"), (tumour, TUMOUR_COLOR, "T")):
        for r in records:
            boxes.setdefault(r.slice, []).append(OverlayBox(r.box, color, f"{tag} {r.confidence:.2f}"))
    return write_overlay_pngs(folder, view, boxes, variant)
