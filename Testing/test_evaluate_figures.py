"""`minigpt-pancreas-train evaluate`: the figures (IoU histograms, box heat maps, example overlays) written from
saved answers on a small prepared set, and the baselines (fixed mean training box, majority class) against
numbers computed by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.overlays import PREDICTION_COLOR, TRUTH_COLOR
from small_prepared import prepare_small_msd
from SlicerMiniGPTPancreas.grammar import render_box
from SlicerMiniGPTPancreas.metrics import SampleScore
from test_evaluate import entries_of, hand_iou, hand_prepared, rescore, write_answers
from training.evaluate_baseline import BOX_LABEL, MAJORITY_LABEL
from training.evaluate_figures import CAPTION_HEIGHT, EXAMPLE_WIDTH, box_heatmap, choose_examples, example_overlay

DETECTION = ("pancreas_detection_msd", "tumor_detection_balanced_msd")
TASKS = (*DETECTION, "tumor_classification")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_small_msd(tmp_path_factory.mktemp("data"))


def answer_all(out: Path, prepared: Path, shift: int = 0) -> None:
    """Answers by hand for TASKS: the truth box moved `shift` pixels right and down (0: perfect answers)."""
    for task in DETECTION:
        entries = entries_of(prepared, task)
        write_answers(out, task, entries, {e["q_id"]: render_box(_shifted(e, shift), e["width"], e["height"])
                                           for e in entries})
    entries = entries_of(prepared, "tumor_classification")
    write_answers(out, "tumor_classification", entries, {e["q_id"]: (e["answer"], 0.6) for e in entries})


def _shifted(entry: dict, shift: int) -> list[int] | None:
    if not any(entry["bbox"]):
        return None
    x_min, y_min, x_max, y_max = entry["bbox"]
    dx, dy = min(shift, entry["width"] - 1 - x_max), min(shift, entry["height"] - 1 - y_max)
    return [x_min + dx, y_min + dy, x_max + dx, y_max + dy]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def has_color(image: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool(np.all(image == np.array(color, dtype=np.uint8), axis=-1).any())


# ----------------------------------------------------------------------------------------------- figures

def test_figures_are_pngs_that_follow_the_answers_and_rescore_rewrites_them(prepared, tmp_path):
    perfect, shifted = tmp_path / "perfect", tmp_path / "shifted"
    answer_all(perfect, prepared)
    answer_all(shifted, prepared, shift=4)
    metrics = rescore(perfect, prepared, TASKS)
    rescore(shifted, prepared, TASKS)

    figures = metrics["figures"]
    assert (figures["iou_histograms"], figures["heatmaps"]) == ("iou_histograms.png", "heatmaps.png")
    for name in ("iou_histograms.png", "heatmaps.png"):
        image = pixels(perfect / name)
        assert 300 <= image.shape[1] <= 2000 and 200 <= image.shape[0] <= 3000, name
        assert (perfect / name).stat().st_size < 500_000, name
    # Same truth, other answers: the predicted half of the heat maps differs.
    assert not np.array_equal(pixels(perfect / "heatmaps.png"), pixels(shifted / "heatmaps.png"))

    scored = {"pancreas_detection_msd": len(entries_of(prepared, "pancreas_detection_msd")),
              "tumor_detection_balanced_msd": sum(any(e["bbox"]) for e in entries_of(prepared,
                                                                                    "tumor_detection_balanced_msd"))}
    for task, count in scored.items():
        written = sorted((shifted / "examples" / task).glob("*.png"))
        assert len(written) == min(6, count), task
        for path in written:
            image = pixels(path)
            assert image.shape[1] <= EXAMPLE_WIDTH
            body = image[:-CAPTION_HEIGHT]  # the caption below is white text only
            assert has_color(body, TRUTH_COLOR) and has_color(body, PREDICTION_COLOR), path
    assert sorted(metrics["figures"]["examples"]) == sorted(
        path.relative_to(perfect).as_posix() for path in (perfect / "examples").rglob("*.png"))
    assert not list(perfect.rglob(".tmp-*"))  # written whole

    # --rescore alone (no model) rewrites every figure from the answers now saved.
    before = pixels(perfect / "heatmaps.png")
    answer_all(perfect, prepared, shift=4)
    (perfect / "iou_histograms.png").unlink()
    metrics = rescore(perfect, prepared, TASKS)
    assert np.array_equal(pixels(perfect / "heatmaps.png"), pixels(shifted / "heatmaps.png"))
    assert not np.array_equal(pixels(perfect / "heatmaps.png"), before)
    assert (perfect / "iou_histograms.png").is_file() and len(metrics["figures"]["examples"]) == len(
        list((perfect / "examples").rglob("*.png")))

    # Scoring no detection task leaves no figure of the earlier scoring behind.
    metrics = rescore(perfect, prepared, ["tumor_classification"])
    assert metrics["figures"] == {"skipped": "no detection task was scored"}
    assert not any((perfect / name).exists() for name in ("iou_histograms.png", "heatmaps.png", "examples"))


def test_a_box_fills_the_heat_map_cells_it_covers():
    # Columns 50..99 of 200 are [0.25, 0.5) of the width; rows 10..29 of 100 are [0.1, 0.3) of the height.
    heat = box_heatmap([(50, 10, 99, 29), (0, 0, 0, 0)], [(200, 100), (1000, 1000)])
    expected = np.zeros((100, 100), dtype=int)
    expected[10:30, 25:50] += 1
    expected[0, 0] += 1  # a box smaller than a cell still marks the one it lies in
    assert np.array_equal(heat, expected)


def sample(index: int, iou: float | None, pred_box=None) -> SampleScore:
    return SampleScore(index, None, pred_box, False, iou is None, iou, iou, bool(iou and iou >= 0.5), None)


def test_examples_run_evenly_from_the_best_to_the_worst_iou():
    samples = [sample(i, iou) for i, iou in enumerate([0.2, 0.9, None, 0.5, 0.7, 0.1])]
    assert [s.index for s in choose_examples(samples, 3)] == [1, 3, 5]  # best, median, worst
    assert [s.index for s in choose_examples(samples, 10)] == [1, 4, 3, 0, 5]
    assert choose_examples(samples, 0) == []


def test_a_large_slice_is_shrunk_to_the_example_width_with_its_boxes():
    slice_image = Image.new("RGB", (512, 400), (60, 60, 60))
    overlay = np.asarray(example_overlay(slice_image, {"bbox": [100, 100, 199, 199], "q_id": 7},
                                         sample(0, 0.0, pred_box=(300.0, 300.0, 399.0, 399.0))))
    assert overlay.shape == (200 + CAPTION_HEIGHT, EXAMPLE_WIDTH, 3)
    assert tuple(overlay[50, 75]) == TRUTH_COLOR and tuple(overlay[99, 75]) == TRUTH_COLOR  # pixels 100..199 / 2
    assert tuple(overlay[150, 175]) == PREDICTION_COLOR


# --------------------------------------------------------------------------------------------- baselines

def write_train(prepared: Path, task: str, entries: list[dict]) -> None:
    (prepared / "tasks" / f"{task}_train.json").write_text(json.dumps(entries))


def box_entry(box, width, height, phrase="pancreas"):
    return {"bbox": box, "width": width, "height": height, "phrase": phrase, "answer": "", "dataset": "MSD"}


def test_fixed_box_and_majority_baselines_match_a_hand_computation(tmp_path):
    tests = {"pancreas_detection_nih": [box_entry([30, 60, 75, 120], 200, 200), box_entry([20, 30, 40, 60], 100, 100),
                                        box_entry([70, 70, 90, 90], 100, 100)],
             "pancreas_detection_msd": [box_entry([5, 5, 25, 25], 50, 50)],
             "tumor_detection_balanced_msd": [box_entry([0, 0, 0, 0], 100, 100), box_entry([10, 10, 20, 20], 100, 100)],
             "tumor_detection_msd": [box_entry([10, 10, 20, 20], 100, 100)],
             "tumor_classification": [{"answer": a, "dataset": "MSD"} for a in ("yes", "no", "no", "no")]}
    prepared = hand_prepared(tmp_path / "prep", tests)
    # Normalised (0.1, 0.2, 0.3, 0.4) and (0.2, 0.4, 0.45, 0.8): the mean box is (0.15, 0.3, 0.375, 0.6).
    write_train(prepared, "pancreas_detection_nih", [box_entry([10, 20, 30, 40], 100, 100),
                                                     box_entry([40, 40, 90, 80], 200, 100)])
    write_train(prepared, "pancreas_detection_msd", [box_entry([5, 5, 25, 25], 50, 50)])
    write_train(prepared, "tumor_detection_balanced_msd", [box_entry([0, 0, 0, 0], 100, 100),  # empty: left out
                                                           box_entry([10, 10, 20, 20], 100, 100)])
    write_train(prepared, "tumor_classification", [{"answer": a} for a in ("yes", "yes", "no")])
    for task, entries in tests.items():
        write_answers(tmp_path / "eval", task, entries, {})  # the baselines need no answers
    metrics = rescore(tmp_path / "eval", prepared, list(tests))

    nih = metrics["tasks"]["pancreas_detection_nih"]["baseline"]
    fixed = [(30, 60, 75, 120), (15, 30, 37.5, 60), (15, 30, 37.5, 60)]  # the mean box at each entry's size
    ious = [hand_iou(box, e["bbox"], plus=1) for box, e in zip(fixed, tests["pancreas_detection_nih"])]
    assert ious[0] == 1.0 and 0.5 < ious[1] < 1.0 and ious[2] == 0.0
    assert nih["label"] == BOX_LABEL and nih["protocol"] == "STRICT"
    assert nih["boxes"]["pancreas"] == {"box": pytest.approx([0.15, 0.3, 0.375, 0.6]), "n_train": 2}
    assert (nih["n"], nih["mean_iou"], nih["hit_rate"]) == (3, pytest.approx(sum(ious) / 3), pytest.approx(2 / 3))
    combined = metrics["combined"]["pancreas_detection_weighted"]["baseline"]
    assert combined["mean_iou"] == pytest.approx((sum(ious) + 1.0) / 4)
    balanced = metrics["tasks"]["tumor_detection_balanced_msd"]["baseline"]
    assert (balanced["n"], balanced["n_scored"], balanced["mean_iou"], balanced["hit_rate"]) == (2, 1, 1.0, 1.0)
    assert "tumor_detection_msd_train.json is missing" in metrics["tasks"]["tumor_detection_msd"]["baseline"][
        "unavailable"]
    majority = metrics["tasks"]["tumor_classification"]["baseline"]
    assert (majority["label"], majority["answer"], majority["n_train"]) == (MAJORITY_LABEL, "yes", {"yes": 2, "no": 1})
    assert (majority["accuracy"], majority["balanced_accuracy"]) == (0.25, 0.5)

    tables = (tmp_path / "eval" / "tables.md").read_text(encoding="utf-8")
    assert f"IoU {BOX_LABEL}, STRICT" in tables and f"hit rate {BOX_LABEL}, STRICT" in tables
    assert f"{MAJORITY_LABEL} ('yes')" in tables and "tumor_detection_msd_train.json is missing" in tables
    rows = list(csv.DictReader((tmp_path / "eval" / "tables.csv").read_text().splitlines()))
    fixed_rows = {row["task"]: row for row in rows if row["predictor"] == BOX_LABEL}
    assert float(fixed_rows["pancreas_detection_nih"]["mean_iou"]) == pytest.approx(sum(ious) / 3)
    assert float(fixed_rows["pancreas_detection_weighted"]["hit_rate"]) == pytest.approx(3 / 4)
    majority_row = next(row for row in rows if row["predictor"] == MAJORITY_LABEL)
    assert (float(majority_row["accuracy"]), float(majority_row["balanced_accuracy"])) == (0.25, 0.5)
