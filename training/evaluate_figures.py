"""The evaluation's figures, as in the MiniGPT-Pancreas paper; every file is written whole (temporary file, then
rename), and a figure that no longer applies is deleted, so no picture of an earlier scoring sits next to new
numbers.

    iou_histograms.png   per-answer IoU, one panel per (detection task, protocol)
    heatmaps.png         per detection task, where the truth boxes and the model's boxes (decoded as STRICT
                         does) lie: every box adds 1 to the cells it covers on a 100 x 100 canvas of the
                         normalised slice (x = column / width, y = row / height); both maps share one scale
    examples/<task>/     a few test slices (best to worst STRICT IoU, evenly spaced) with the truth box in
                         green, the model's box in red and the IoU below; at most 256 px wide
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from backend.overlays import PREDICTION_COLOR, TRUTH_COLOR, OverlayBox, draw_overlay
from SlicerMiniGPTPancreas.atomic import atomic_write
from SlicerMiniGPTPancreas.metrics import SampleScore
from training.evaluate_scoring import VARIANT_NAMES, strict_samples
from training.evaluate_tasks import TaskSet

HISTOGRAMS, HEATMAPS, EXAMPLES_DIR = "iou_histograms.png", "heatmaps.png", "examples"
FIGURE_FILES = (HISTOGRAMS, HEATMAPS)
DEFAULT_EXAMPLES = 6  # example overlays per detection task
CANVAS = 100  # heat-map cells per side of the normalised slice
EXAMPLE_WIDTH = 256
CAPTION_HEIGHT = 16


def write_figures(out: Path, prepared: Path, tasks: list[TaskSet], predictions: dict[str, dict[int, dict[str, Any]]],
                  ious: dict[str, dict[str, list[float]]], examples: int = DEFAULT_EXAMPLES) -> dict[str, Any]:
    """Write every figure into `out`; return what metrics.json records about them (file names, or why not).
    predictions: {task: {q_id: saved answer}}; ious: `score_all`'s per-answer IoUs."""
    out = Path(out)
    detection = [task for task in tasks if task.kind == "detection"]
    if not detection:
        for name in FIGURE_FILES:
            (out / name).unlink(missing_ok=True)
        remove_examples(out)
        return {"skipped": "no detection task was scored"}
    samples = {task.name: strict_samples(task, [predictions[task.name].get(entry["q_id"]) for entry in task.entries])
               for task in detection}
    _save_figure(out / HISTOGRAMS, lambda: plot_iou_histograms(ious))
    _save_figure(out / HEATMAPS, lambda: plot_heatmaps(detection, samples))
    written, missing = [], 0
    for task in detection:
        task_written, task_missing = write_examples(out, prepared, task, samples[task.name], examples)
        written += task_written
        missing += task_missing
    remove_examples(out, keep=written)
    figures: dict[str, Any] = {"iou_histograms": HISTOGRAMS, "heatmaps": HEATMAPS,
                               "examples": [path.relative_to(out).as_posix() for path in written]}
    if missing:
        figures["examples_skipped"] = f"{missing} chosen slice(s) have no image under {prepared}"
    return figures


def _save_figure(path: Path, draw: Callable[[], Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure = draw()
    try:
        atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=80))
    finally:
        plt.close(figure)


# ----------------------------------------------------------------------------------------------- histograms

def plot_iou_histograms(ious: dict[str, dict[str, list[float]]]):
    """Histograms of per-answer IoU, one panel per (task, protocol); returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(ious), len(VARIANT_NAMES), figsize=(3.2 * len(VARIANT_NAMES), 2.4 * len(ious)),
                                squeeze=False, sharex=True, layout="tight")
    for row, (task, by_variant) in enumerate(ious.items()):
        for column, variant in enumerate(VARIANT_NAMES):
            axis = axes[row][column]
            values = by_variant.get(variant)
            if values is None:
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
            else:
                axis.hist(values, bins=20, range=(0.0, 1.0), color="tab:blue")
            axis.set_title(f"{task}\n{variant} (n={0 if values is None else len(values)})", fontsize=8)
            axis.tick_params(labelsize=7)
    for axis in axes[-1]:
        axis.set_xlabel("IoU", fontsize=8)
    return figure


# ------------------------------------------------------------------------------------------------ heat maps

def box_heatmap(boxes: list[tuple[float, ...]], sizes: list[tuple[int, int]]) -> np.ndarray:
    """[CANVAS, CANVAS] counts: each box adds 1 to every cell its pixels overlap. boxes: (x_min, y_min, x_max,
    y_max) in pixel index coordinates, the max inclusive, so a box spans [min, max + 1) of its W x H slice."""
    heat = np.zeros((CANVAS, CANVAS), dtype=np.int64)
    for (x_min, y_min, x_max, y_max), (width, height) in zip(boxes, sizes):
        columns = _cells(x_min, x_max + 1, width)
        rows = _cells(y_min, y_max + 1, height)
        heat[rows, columns] += 1
    return heat


def _cells(low: float, high: float, size: int) -> slice:
    """The canvas cells that [low, high) of a slice `size` pixels long overlaps (at least one)."""
    # Multiplying first keeps whole-pixel edges exact (0.3 * 100 is 30.000000000000004, 30 * 100 / 100 is 30).
    first = min(max(math.floor(low * CANVAS / size), 0), CANVAS - 1)
    return slice(first, min(max(math.ceil(high * CANVAS / size), first + 1), CANVAS))


def plot_heatmaps(tasks: list[TaskSet], samples: dict[str, list[SampleScore]]):
    """One row per task: truth boxes and STRICT-decoded predicted boxes, same colour scale; returns the figure."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(tasks), 2, figsize=(7.0, 3.3 * len(tasks)), squeeze=False, layout="constrained")
    for row, task in enumerate(tasks):
        sizes = [(entry["width"], entry["height"]) for entry in task.entries]
        truths = [(entry["bbox"], size) for entry, size, sample in zip(task.entries, sizes, samples[task.name])
                  if not sample.truth_absent]
        predicted = [(sample.pred_box, size) for sample, size in zip(samples[task.name], sizes)
                     if sample.pred_box is not None]
        maps = [box_heatmap([box for box, _ in pairs], [size for _, size in pairs]) for pairs in (truths, predicted)]
        top = max(1, max(int(heat.max()) for heat in maps))
        titles = (f"{task.name}\nground truth: {len(truths)} boxes",
                  f"{task.name}\npredicted (STRICT): {len(predicted)} boxes / {len(task.entries)} answers")
        for axis, heat, title in zip(axes[row], maps, titles):
            image = axis.imshow(heat, cmap="hot", vmin=0, vmax=top, extent=(0, 1, 1, 0), interpolation="nearest")
            axis.set_title(title, fontsize=8)
            axis.set_xlabel("column / width", fontsize=7)
            axis.set_ylabel("row / height", fontsize=7)
            axis.tick_params(labelsize=6)
        figure.colorbar(image, ax=list(axes[row]), shrink=0.8, label="boxes covering the cell")
    return figure


# ------------------------------------------------------------------------------------------------- examples

def choose_examples(samples: list[SampleScore], count: int) -> list[SampleScore]:
    """`count` scored samples evenly spaced from the best to the worst IoU (the median in between); ties keep
    the entries' order, so the choice is the same every run."""
    ranked = sorted((sample for sample in samples if sample.iou is not None), key=lambda s: (-s.iou, s.index))
    if count <= 0 or not ranked:
        return []
    positions = np.linspace(0, len(ranked) - 1, min(count, len(ranked))).round().astype(int)
    return [ranked[position] for position in dict.fromkeys(positions.tolist())]


def write_examples(out: Path, prepared: Path, task: TaskSet, samples: list[SampleScore],
                   count: int) -> tuple[list[Path], int]:
    """Write the chosen example overlays of one task; return (paths written, chosen slices without an image)."""
    written, missing = [], 0
    for rank, sample in enumerate(choose_examples(samples, count), start=1):
        entry = task.entries[sample.index]
        source = Path(prepared) / entry["image"]
        if not source.is_file():
            missing += 1
            continue
        path = Path(out) / EXAMPLES_DIR / task.name / f"{rank}_q{entry['q_id']}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as slice_image:
            overlay = example_overlay(slice_image, entry, sample)
        atomic_write(path, lambda temporary: overlay.save(temporary, format="PNG", optimize=True))
        written.append(path)
    return written, missing


def example_overlay(slice_image: Image.Image, entry: dict[str, Any], sample: SampleScore) -> Image.Image:
    """The slice with the truth (green) and predicted (red) boxes, at most EXAMPLE_WIDTH wide, IoU below."""
    factor = min(1.0, EXAMPLE_WIDTH / slice_image.width)
    if factor < 1.0:  # shrink before drawing, so the one-pixel outlines stay sharp
        slice_image = slice_image.convert("RGB").resize(
            (round(slice_image.width * factor), round(slice_image.height * factor)), Image.BILINEAR)
    boxes = [OverlayBox(_scaled(entry["bbox"], factor), TRUTH_COLOR)]
    if sample.pred_box is not None:
        boxes.append(OverlayBox(_scaled(sample.pred_box, factor), PREDICTION_COLOR))
    overlay = draw_overlay(slice_image, boxes, side=EXAMPLE_WIDTH)
    framed = Image.new("RGB", (overlay.width, overlay.height + CAPTION_HEIGHT))
    framed.paste(overlay)
    # Short enough for the narrowest example (about 40 characters of PIL's default font in 250 px).
    caption = f"IoU {sample.iou:.3f} (STRICT)  q_id {entry['q_id']}" + ("  no box" if sample.pred_box is None else "")
    ImageDraw.Draw(framed).text((2, overlay.height + 2), caption, fill=(255, 255, 255))
    return framed


def _scaled(box, factor: float) -> tuple[float, ...]:
    """An inclusive index box of the slice in index coordinates of the slice shrunk by `factor`: its pixel
    extent [min, max + 1) scales, then the max becomes inclusive again."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    return (x_min * factor, y_min * factor, (x_max + 1) * factor - 1, (y_max + 1) * factor - 1)


def remove_examples(out: Path, keep: Sequence[Path] = ()) -> None:
    """Delete the example PNGs of earlier scorings (all but `keep`) and the folders they leave empty."""
    folder = Path(out) / EXAMPLES_DIR
    if not folder.is_dir():
        return
    for path in set(folder.glob("*/*.png")) - set(keep):
        path.unlink()
    for task_folder in [path for path in folder.iterdir() if path.is_dir()] + [folder]:
        if not any(task_folder.iterdir()):
            task_folder.rmdir()
