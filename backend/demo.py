"""`minigpt-pancreas demo`: the main job on the embedded default, the bundled demo model and a synthetic CT.

End to end, through the same code as `minigpt-pancreas predict --cascade`:
  1. draws a synthetic abdominal CT with a pancreatic tumour (a seed the demo model never saw in training; matrix,
     field of view, slice thickness and storage orientation drawn like any scan) and writes it with its labels as
     NIfTI files;
  2. reads the CT file back and shows it to the model as radiological axial slices (`predict.read_volume`);
  3. asks the cascade's questions of every slice with the bundled demo model: the pancreas box, tumour yes/no with
     P(yes), and the tumour box where the answer is yes (`backend.cascade_sweep`);
  4. writes boxes.csv, boxes.mrk.json, answers.json, overlays (truth green, pancreas red, tumour orange) and
     summary.json, all at once (a failed run leaves the previous output as it was); an existing --out is replaced
     only when it holds nothing but an earlier demo output, and it is checked before the model loads;
  5. scores the answers against the phantom's truth under the strict protocol: pancreas IoU over every slice
     with pancreas (no box = 0), tumour yes/no accuracy over those slices, tumour IoU over every slice with tumour.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from SlicerMiniGPTPancreas.atomic import staged_folder

DEFAULT_SEED = 7  # the demo cascade trains on seeds >= 100000, so this patient is unseen
COMMAND_NAME = "minigpt-pancreas demo"  # recorded in summary.json: marks a folder this command may replace
PHANTOM_FILES = ("phantom_ct.nii.gz", "phantom_labels.nii.gz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from backend.commands.model_options import add_model_arguments

    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="output folder (default: demo-output); an earlier demo output there is replaced whole, "
                             "a folder holding other files is refused")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"synthetic patient and scan (default {DEFAULT_SEED}; any seed below 100000 is unseen)")
    parser.add_argument("--orientation", default=None, metavar="CODE",
                        help="store the CT in this axis-aligned orientation (LPS, RAS, LAS, RPI, ASL, LSP...) instead "
                             "of the one drawn with the scan; the answers must not change")
    add_model_arguments(parser, close_up=True)


def run(args: argparse.Namespace) -> int:
    from backend.commands.model_options import engine_from_args, resolve_model_source
    from backend.commands.predict_outputs import OUTPUT_NAMES, check_output_folder, writing

    started = time.perf_counter()
    out = Path(args.out).absolute()
    resolve_model_source(args)  # prints which model, first
    check_output_folder(out, COMMAND_NAME, names=OUTPUT_NAMES | set(PHANTOM_FILES))
    engine = engine_from_args(args)
    with writing(out), staged_folder(out) as folder:
        summary = _run_into(folder, out, engine, args.seed, args.orientation, started)
    _print_summary(summary, out)
    return 0


def _run_into(folder: Path, out: Path, engine, seed: int, orientation: str | None, started: float) -> dict:
    """Write the demo into the staging `folder`, which becomes `out` once everything is written."""
    import SimpleITK as sitk

    from backend.commands.cascade_outputs import write_cascade_outputs
    from backend.commands.predict import sweep_volume
    from backend.commands.predict_outputs import write_json
    from SlicerMiniGPTPancreas import geometry, phantom, phantom_writers

    ct = phantom.make_phantom(seed, tumour=True, **phantom.sample_scan_parameters(seed))
    if orientation is not None:
        ct = phantom.reorient(ct, orientation)  # the same voxels, transposed and flipped
    ct_path, labels_path = (folder / name for name in PHANTOM_FILES)
    sitk.WriteImage(phantom_writers.to_sitk_image(ct), str(ct_path), True)
    sitk.WriteImage(phantom_writers.to_sitk_labels(ct), str(labels_path), True)
    view = geometry.ModelView.from_volume(*geometry.volume_from_sitk(_read_back(ct_path, out)))
    labels = geometry.ModelView.from_volume(*geometry.volume_from_sitk(_read_back(labels_path, out)))
    slices = range(view.shape[0])
    answers = sweep_volume(engine, view, slices)
    truth = [_truth(labels.slice(s)) for s in slices]
    details = {"command": COMMAND_NAME, "volume": str(out / ct_path.name), "prompt": "cascade",
               "model": engine.model_id, "synthetic_model": engine.synthetic, "device": engine.device,
               "precision": engine.precision, "image_variant": engine.image_variant,
               "box_decoding": engine.box_decoding, "close_up_zoom": engine.close_up_zoom,
               "phantom": {"seed": seed, "orientation": ct.orientation, "shape_kji": list(ct.shape),
                           "spacing_mm": [round(v, 3) for v in ct.spacing]}}
    shown = {s: [box for box in pair if box is not None] for s, pair in zip(slices, truth) if any(pair)}
    summary = write_cascade_outputs(folder, view, list(slices), answers, details=details,
                                    seconds=time.perf_counter() - started, truth=shown)
    summary["scores"] = score_against_truth(answers, truth)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    write_json(folder / "summary.json", summary)
    return summary


def _read_back(path: Path, out: Path):
    """The image just written at `path`. SimpleITK's NIfTI writer reports a failed write (a full disk) only on
    stderr, so a file that cannot be read back was not written whole."""
    from backend.commands.predict import read_volume
    from backend.commands.predict_outputs import OutputFolderError
    from SlicerMiniGPTPancreas.errors import UserError

    try:
        return read_volume(path)
    except UserError as error:
        raise OutputFolderError(f"cannot write --out {out}: {path.name} was not written whole (is the disk full?). "
                                "Free disk space or choose another --out; nothing was written there.") from error


def _truth(label_slice: np.ndarray):
    """(pancreas box incl. tumour, tumour box) of one model-view label slice (MSD labels: 1 pancreas, 2 tumour)."""
    from SlicerMiniGPTPancreas import geometry

    return geometry.mask_box(np.isin(label_slice, (1, 2))), geometry.mask_box(label_slice == 2)


def score_against_truth(answers, truth) -> dict:
    """Strict scores: every slice with the structure counts, a missing box scores 0."""
    from SlicerMiniGPTPancreas import metrics

    def iou(result, box) -> float:
        if result is None or not result.boxes:
            return 0.0
        return metrics.box_iou(result.boxes[0].box, box, convention="plus_one")

    pancreas = [iou(a.pancreas, t[0]) for a, t in zip(answers, truth) if t[0] is not None]
    tumour = [iou(a.tumour, t[1]) for a, t in zip(answers, truth) if t[1] is not None]
    said = [(bool(a.tumour_said), t[1] is not None) for a, t in zip(answers, truth) if t[0] is not None]
    positives = [s for s, truly in said if truly]
    negatives = [not s for s, truly in said if not truly]
    recall = float(np.mean(positives)) if positives else None
    specificity = float(np.mean(negatives)) if negatives else None
    return {
        "pancreas_iou": _mean(pancreas), "pancreas_slices": len(pancreas),
        "tumour_iou": _mean(tumour), "tumour_slices": len(tumour),
        "tumour_yes_no_accuracy": _mean([float(s == truly) for s, truly in said]),
        "tumour_yes_no_balanced_accuracy": None if recall is None or specificity is None
        else (recall + specificity) / 2,
        "tumour_sensitivity": recall, "tumour_specificity": specificity,
    }


def _mean(values) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _print_summary(summary: dict, out: Path) -> None:
    scores, phantom = summary["scores"], summary["phantom"]

    def shown(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"MiniGPT-Pancreas demo: {summary['model']} on a synthetic CT (seed {phantom['seed']}, stored "
          f"{phantom['orientation']}, model view {summary['model_view_shape']}), {summary['seconds']:.1f} s")
    print(f"  pancreas IoU {shown(scores['pancreas_iou'])} over {scores['pancreas_slices']} slices with pancreas; "
          f"tumour yes/no accuracy {shown(scores['tumour_yes_no_accuracy'])} (balanced "
          f"{shown(scores['tumour_yes_no_balanced_accuracy'])}); tumour IoU {shown(scores['tumour_iou'])} over "
          f"{scores['tumour_slices']} slices with tumour (strict: a missing box scores 0)")
    print(f"  wrote {out}/: phantom_ct.nii.gz, phantom_labels.nii.gz, {', '.join(summary['files'])}")
    print("  next: open phantom_ct.nii.gz and boxes.mrk.json in 3D Slicer (File > Add Data); or run "
          "`minigpt-pancreas serve` and use the MiniGPT-Pancreas module in Slicer")
