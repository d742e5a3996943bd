"""`minigpt-pancreas demo`: the main job on the embedded default, a synthetic abdominal CT.

What it does, end to end, with the same code the Slicer module and the service use:
  1. builds a seeded CT phantom (pancreas with a tumour) stored in a chosen file orientation, writes it as NIfTI;
  2. reads the file back with SimpleITK and reorients it to the model view (radiological axial slices);
  3. turns every slice that holds pancreas into the exact 8-bit image the model consumes;
  4. gets an answer per slice in the model's box grammar, parses it, maps the box back to pixels and to
     patient coordinates (RAS), and scores it against the phantom's truth;
  5. writes the slices, overlays, a CSV of boxes in RAS and a JSON summary, all at once (no half-written output).

No trained demo model is bundled yet, so step 4's answers are the ground truth rendered in the model's grammar:
the run exercises everything around the model, and its IoU shows what the 0-100 box grid alone costs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from backend.output_folder import staged_folder

ANSWER_SOURCE = "ground truth rendered in the model's box grammar (no trained demo model is bundled yet)"
OVERLAY_COUNT = 3
DEMO_SIZE_MM = (358.4, 358.4, 200.0)  # left-right, anterior-posterior, inferior-superior
DEMO_SPACING_MM = (0.7, 0.7, 5.0)  # -> 512 x 512 x 40 voxels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from SlicerMiniGPTPancreas.phantom import ORIENTATIONS

    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (replaced whole)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument(
        "--orientation", choices=ORIENTATIONS, default="RAS",
        help="storage orientation of the synthetic file (default RAS, as NIfTI files often are)",
    )
    parser.add_argument(
        "--decode", choices=("center", "floor"), default="center",
        help="map grid values to the centre of their cell (default) or floor them as upstream did",
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    with staged_folder(out) as folder:
        summary = _run_into(folder, args)
    _print_summary(summary, out)
    return 0


def _run_into(folder: Path, args: argparse.Namespace) -> dict:
    import SimpleITK as sitk

    from SlicerMiniGPTPancreas import geometry, grammar, metrics, phantom, phantom_writers, preprocess

    # A clinical 512 x 512 in-plane grid, so the 0-100 answer grid costs what it costs on real CT.
    ct = phantom.make_phantom(seed=args.seed, orientation=args.orientation, tumour=True,
                              size_mm=DEMO_SIZE_MM, spacing=DEMO_SPACING_MM)
    ct_path, labels_path = folder / "phantom_ct.nii.gz", folder / "phantom_labels.nii.gz"
    sitk.WriteImage(phantom_writers.to_sitk_image(ct), str(ct_path), True)
    sitk.WriteImage(phantom_writers.to_sitk_labels(ct), str(labels_path), True)

    view = geometry.ModelView.from_volume(*geometry.volume_from_sitk(sitk.ReadImage(str(ct_path))))
    label_view = geometry.ModelView.from_volume(*geometry.volume_from_sitk(sitk.ReadImage(str(labels_path))))

    (folder / "slices").mkdir()
    rows, ious = [], []
    for s in range(view.shape[0]):
        truth = geometry.mask_box(np.isin(label_view.slice(s), (1, 2)))  # pancreas incl. tumour
        if truth is None:
            continue
        rgb = preprocess.hu_slice_to_rgb(view.slice(s))  # [R, C, 3] uint8
        height, width = rgb.shape[:2]
        answer = grammar.render_box(truth, width, height)
        parsed = grammar.parse_answer(answer)
        box = grammar.grid_to_pixels(parsed.grid_boxes[0], width, height, mode=args.decode)
        iou = metrics.box_iou(box, truth, convention="plus_one")  # pixel extents, as the strict protocol
        center, size = view.box_to_ras(box, s)
        ious.append(iou)
        rows.append(_row(s, answer, box, truth, iou, center, size))
        _save_png(rgb, folder / "slices" / f"phantom_slice_{s}.png")

    _write_csv(folder / "boxes_ras.csv", rows)
    overlays = _write_overlays(folder, rows)
    summary = {
        "phantom": {"seed": args.seed, "orientation": args.orientation, "spacing_mm": list(view.spacing)},
        "model_view_shape": list(view.shape),
        "answer_source": ANSWER_SOURCE,
        "decode": args.decode,
        "slices_with_pancreas": len(rows),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "overlays": overlays,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _row(s, answer, box, truth, iou, center, size) -> dict:
    return {
        "slice": s, "answer": answer,
        "x_min": round(box[0], 2), "y_min": round(box[1], 2), "x_max": round(box[2], 2), "y_max": round(box[3], 2),
        "truth": list(truth), "iou": round(iou, 4),
        "center_r": round(center[0], 2), "center_a": round(center[1], 2), "center_s": round(center[2], 2),
        "size_r": round(size[0], 2), "size_a": round(size[1], 2), "size_s": round(size[2], 2),
    }


def _save_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(rgb, mode="RGB").save(path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["slice"])
        writer.writeheader()
        writer.writerows(rows)


def _write_overlays(folder: Path, rows: list[dict]) -> list[str]:
    """Draw truth (green) and decoded box (red) on the slices with the largest pancreas, scaled up for viewing."""
    from PIL import Image

    from backend.overlays import PREDICTION_COLOR, TRUTH_COLOR, OverlayBox, draw_overlay

    largest = sorted(rows, key=lambda r: -(r["truth"][2] - r["truth"][0]) * (r["truth"][3] - r["truth"][1]))
    names = []
    for row in largest[:OVERLAY_COUNT]:
        image = Image.open(folder / "slices" / f"phantom_slice_{row['slice']}.png")
        box = [row["x_min"], row["y_min"], row["x_max"], row["y_max"]]
        overlay = draw_overlay(image, [OverlayBox(row["truth"], TRUTH_COLOR), OverlayBox(box, PREDICTION_COLOR)])
        name = f"overlay_slice_{row['slice']}.png"
        overlay.save(folder / name)
        names.append(name)
    return names


def _print_summary(summary: dict, out: Path) -> None:
    print("MiniGPT-Pancreas demo on a synthetic abdominal CT")
    print(f"  phantom: seed {summary['phantom']['seed']}, stored {summary['phantom']['orientation']}, "
          f"model view {summary['model_view_shape']} (slices, rows, cols)")
    print(f"  answers: {summary['answer_source']}")
    print(f"  slices with pancreas: {summary['slices_with_pancreas']}; "
          f"mean IoU of decoded boxes vs truth ({summary['decode']} decoding): {summary['mean_iou']:.3f}")
    print(f"  wrote {out}/: slices/*.png, boxes_ras.csv, summary.json, {', '.join(summary['overlays'])}")
