"""The second, closer look (`backend.close_up`): close-ups drawn for training, the window cut at inference, the
cascade sweep and `evaluate` asking of it with the real bundled model, and the setting carried by a model folder."""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.answers import DetectedBox, SliceResult
from backend.cascade_sweep import PANCREAS_QUESTION, TUMOUR_QUESTION, sweep_cascade
from backend.close_up import Window, window_round
from backend.demo_model import DEMO_MODEL_DIR
from backend.engine import InferenceEngine
from backend.model_dir import MANIFEST_FILE, CheckpointError, close_up_zoom, read_manifest
from backend.service import create_app
from live_server import LiveServer
from SlicerMiniGPTPancreas import grammar, phantom
from small_prepared import prepare_small_msd
from training.augment import Augmentation, augment_example
from training.cli import main as train_main
from training.evaluate import evaluate, run_settings
from training.evaluate_tasks import EvaluateError

WIDTH, HEIGHT = 200, 160
GLAND = (90, 70, 109, 81)  # inclusive pixel box


def white_box_image(*boxes) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT))
    for box in boxes:
        ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    return image


def box_of(answer: str) -> tuple[float, ...]:
    return grammar.grid_to_pixels(grammar.parse_answer(answer).grid_boxes[0], WIDTH, HEIGHT)


# ------------------------------------------------------------------------------------------------- training

def test_a_close_up_enlarges_the_gland_but_does_not_centre_it():
    answer = grammar.render_box(GLAND, WIDTH, HEIGHT)
    settings = Augmentation(focus=1.0, focus_zoom=(1.5, 2.5), focus_jitter=0.1)
    scales, centres = [], []
    for seed in range(30):
        image, (moved,) = augment_example(white_box_image(GLAND), [answer], settings, random.Random(seed), answer)
        box = box_of(moved)
        columns, rows = np.nonzero(np.asarray(image)[..., 0].T > 127)
        assert np.abs(np.subtract(box, (columns.min(), rows.min(), columns.max(), rows.max()))).max() <= 4
        scales.append((box[2] - box[0]) / (GLAND[2] - GLAND[0]))
        centres.append(((box[0] + box[2]) / 2 - (WIDTH - 1) / 2) / WIDTH)
    # (grid cells of 2 px round a 19 px gland: the measured scale is the zoom within 0.2)
    assert 1.3 <= min(scales) and max(scales) <= 2.7 and max(scales) - min(scales) > 0.5
    # the centre is off the frame's by up to jitter x zoom of the side: never a "the gland is in the middle" rule
    assert max(np.abs(centres)) > 0.1 and max(np.abs(centres)) <= 0.1 * 2.5 + 0.02


def test_a_close_up_that_would_cut_the_asked_organ_falls_back_to_the_plain_draw():
    liver = (10, 10, 150, 140)
    answers = [grammar.render_box(liver, WIDTH, HEIGHT), grammar.render_box(GLAND, WIDTH, HEIGHT)]
    for seed in range(10):
        _, moved = augment_example(white_box_image(liver), answers, Augmentation(focus=1.0), random.Random(seed),
                                   answers[1])
        scale = (box_of(moved[0])[2] - box_of(moved[0])[0]) / (liver[2] - liver[0])
        assert scale <= 1.25 + 0.05  # the plain zoom range, the liver whole


def test_without_focus_the_draws_are_the_recipes_of_before():
    answer = grammar.render_box(GLAND, WIDTH, HEIGHT)
    image = white_box_image(GLAND)
    for seed in range(5):
        with_gland = augment_example(image, [answer], Augmentation(), random.Random(seed), answer)
        without = augment_example(image, [answer], Augmentation(), random.Random(seed))
        assert with_gland[1] == without[1] and np.array_equal(np.asarray(with_gland[0]), np.asarray(without[0]))


# ------------------------------------------------------------------------------------------------ inference

def test_the_window_is_centred_on_the_box_and_kept_inside_the_slice():
    window = window_round((90, 70, 109, 81), 160, 200, zoom=2.0)
    assert (window.row1 - window.row0, window.col1 - window.col0) == (80, 100)  # the slice's aspect
    assert (window.col0 + window.col1) / 2 == pytest.approx(100, abs=1)
    assert (window.row0 + window.row1) / 2 == pytest.approx(76, abs=1)
    corner = window_round((0, 0, 5, 5), 160, 200, zoom=2.0)
    assert (corner.row0, corner.col0) == (0, 0)
    far = window_round((190, 150, 199, 159), 160, 200, zoom=3.0)
    assert (far.row1, far.col1) == (160, 200)
    tiny = window_round((2, 2, 4, 4), 12, 9, zoom=4.0)
    assert (tiny.row1 - tiny.row0, tiny.col1 - tiny.col0) == (8, 8)  # never cut below a slice's smallest size
    with pytest.raises(ValueError, match="from 1.0 to 4.0"):
        window_round(GLAND, 160, 200, zoom=8)


def test_boxes_found_in_the_window_are_moved_back_to_the_slice():
    result = SliceResult("{<1><2><3><4>}", "boxes", (DetectedBox((5.0, 6.0, 15.0, 16.0), None, 0.5),), False, None,
                         None, None, 1.0)
    moved = Window(row0=40, col0=30, row1=120, col1=130).to_slice(result)
    assert moved.boxes[0].box == (35.0, 46.0, 45.0, 56.0) and moved.answer == result.answer


@pytest.fixture(scope="module")
def demo_engine():
    return InferenceEngine.from_model_dir(DEMO_MODEL_DIR, batch_size=8)


@pytest.fixture(scope="module")
def pancreas_slices():
    ct = phantom.make_phantom(11, tumour=True)
    rows = np.nonzero((ct.labels > 0).any(axis=(1, 2)))[0]
    return [ct.hu[k] for k in np.linspace(rows.min(), rows.max(), 4).round().astype(int)]


def test_the_sweep_asks_again_of_the_window_round_the_first_pancreas_box(demo_engine, pancreas_slices):
    answers = sweep_cascade(demo_engine, pancreas_slices, close_up_zoom=2.0)
    once = sweep_cascade(demo_engine, pancreas_slices)
    for slice_hu, answer, plain in zip(pancreas_slices, answers, once):
        assert answer.first_look.answer == plain.pancreas.answer  # the first look is the one-look answer
        window = answer.window
        assert window == window_round(plain.pancreas.boxes[0].box, *slice_hu.shape, 2.0)
        closer = demo_engine.run([window.crop(slice_hu)], PANCREAS_QUESTION)[0]
        assert answer.pancreas.boxes[0].box == window.to_slice(closer).boxes[0].box
        x1, y1, x2, y2 = answer.pancreas.boxes[0].box
        assert window.col0 <= x1 <= x2 <= window.col1 and window.row0 <= y1 <= y2 <= window.row1
        yes_no = demo_engine.run([window.crop(slice_hu)], TUMOUR_QUESTION)[0]
        assert answer.tumour_yes_no.yes_probability == pytest.approx(yes_no.yes_probability)


def test_evaluate_asks_the_pancreas_and_tumour_entries_of_the_window(demo_engine, tmp_path):
    prepared = prepare_small_msd(tmp_path / "data")
    tasks = ["pancreas_detection_msd", "tumor_classification"]
    settings = run_settings("demo", "demo", prepared, close_up_zoom=2.0)
    evaluate(demo_engine, prepared, tmp_path / "eval", settings, tasks, examples=0)
    records = [json.loads(line) for line in (tmp_path / "eval/predictions/pancreas_detection_msd.jsonl").open()]
    entries = {e["q_id"]: e for e in json.loads((prepared / "tasks/pancreas_detection_msd_test.json").read_text())}
    for record in records:
        window, entry = record["window"], entries[record["q_id"]]
        assert record["first_answer"].startswith("{") and record["window_answer"].startswith("{")
        x1, y1, x2, y2 = grammar.grid_to_pixels(grammar.parse_answer(record["answer"]).grid_boxes[0],
                                                entry["width"], entry["height"])
        cell = max(entry["width"], entry["height"]) / 100
        assert window[0] - cell <= x1 <= x2 <= window[2] + cell and window[1] - cell <= y1 <= y2 <= window[3] + cell
    yes_no = [json.loads(line) for line in (tmp_path / "eval/predictions/tumor_classification.jsonl").open()]
    assert all(record["window"] is not None for record in yes_no)
    with pytest.raises(EvaluateError, match="another run .*close_up_zoom"):  # one-look answers are not reused
        evaluate(demo_engine, prepared, tmp_path / "eval", run_settings("demo", "demo", prepared), tasks)


def test_the_service_asks_the_cascade_questions_of_the_close_up_and_others_once(pancreas_slices):
    engine = InferenceEngine.from_model_dir(DEMO_MODEL_DIR, batch_size=8)
    engine.close_up_zoom = 2.0  # as a model folder trained for it says
    slice_hu = pancreas_slices[1].astype(np.int16)
    expected = sweep_cascade(engine, [slice_hu], close_up_zoom=2.0)[0]
    with LiveServer(create_app(engine)) as server, server.client() as api:
        pancreas = api.query_slice(slice_hu, PANCREAS_QUESTION, (1.0, 1.0))
        tumour = api.query_slice(slice_hu, TUMOUR_QUESTION, (1.0, 1.0))
        liver = api.query_slice(slice_hu, "[refer] give me the location of the liver", (1.0, 1.0))
    assert pancreas.boxes[0].box == pytest.approx(expected.pancreas.boxes[0].box)
    assert tumour.yes_probability == pytest.approx(expected.tumour_yes_no.yes_probability, abs=1e-6)
    assert liver.answer == engine.run([slice_hu], "[refer] give me the location of the liver")[0].answer


# ---------------------------------------------------------------------------------------------- model folder

def test_export_records_the_close_up_and_the_engine_reads_it(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["export", str(DEMO_MODEL_DIR), "--out", str(tmp_path / "m"), "--close-up-zoom", "2"]) == 0
    assert close_up_zoom(tmp_path / "m") == 2.0
    assert InferenceEngine.from_model_dir(tmp_path / "m").close_up_zoom == 2.0
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "once"), "--close-up-zoom",
                           "0"]) == 0
    assert close_up_zoom(tmp_path / "once") is None


def test_a_manifest_with_an_impossible_zoom_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL_DIR, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["inference"] = {"close_up_zoom": 9}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="inference.close_up_zoom is 9, expected a number from 1 to 4"):
        read_manifest(folder)


# ---------------------------------------------------------------------------------------------- command line

def test_predict_asks_a_cascade_question_of_the_close_up_and_records_the_zoom(tmp_path, demo_engine, capsys):
    import SimpleITK as sitk

    from backend import cli
    from backend.close_up import answer_closer
    from SlicerMiniGPTPancreas import geometry, phantom_writers

    ct = phantom.make_phantom(11, tumour=True, spacing=(2.0, 2.0, 6.0))
    volume = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom_writers.to_sitk_image(ct), str(volume))
    argv = ["predict", str(volume), "--slices", "10:13", "--batch-size", "8", "--close-up-zoom", "2"]
    assert cli.main(argv + ["--out", str(tmp_path / "closer")]) == 0
    assert cli.main(argv[:-2] + ["--out", str(tmp_path / "default")]) == 0  # as the bundled model says
    closer, default = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("closer", "default"))
    assert closer["close_up_zoom"] == 2.0 and default["close_up_zoom"] == demo_engine.close_up_zoom
    view = geometry.ModelView.from_volume(*geometry.volume_from_sitk(sitk.ReadImage(str(volume))))
    slices = [view.slice(s) for s in range(10, 13)]
    expected = answer_closer(lambda some, q: demo_engine.run(some, q), slices, PANCREAS_QUESTION, 2.0)
    written = json.loads((tmp_path / "closer" / "answers.json").read_text())["slices"]
    assert [s["boxes"][0]["box"] for s in written] == [list(r.boxes[0].box) for r in expected]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(argv[:-1] + ["9", "--out", str(tmp_path / "bad")])
    assert "is not 0 (ask once) or a zoom from 1 to 4" in capsys.readouterr().err
