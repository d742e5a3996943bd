"""`minigpt-pancreas predict` run as a user runs it: a tiny model of the real code, phantom CT files written by
SimpleITK (NIfTI and a DICOM series), every output read back and checked against the others and against box
positions computed by hand."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

import backend
from backend import cli
from backend.commands.predict_outputs import write_outputs
from backend.engine import DetectedBox, SliceResult
from SlicerMiniGPTPancreas import geometry, phantom, phantom_writers
from tiny_upstream_models import build_tiny_upstream

pytestmark = pytest.mark.slow

SPACING = (6.0, 6.0, 10.0)  # 48 x 48 x 20 voxels: quick, and anisotropic so a swapped axis shows
SLICES = "8:11"
QUICK = ["--constrain-boxes", "--batch-size", "4"]  # a random tiny model writes boxes only when constrained


def _ct(orientation: str) -> phantom.Phantom:
    # Noise-free: the phantom's noise is drawn in storage order, and the orientation test needs the same voxels.
    return phantom.make_phantom(seed=1, spacing=SPACING, orientation=orientation, noise_hu=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny upstream files and a model folder imported from them (the same weights)."""
    root = tmp_path_factory.mktemp("tiny")
    files = build_tiny_upstream(root / "upstream")
    model = backend.load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint, image_size=56)
    return files, backend.save_model_dir(model, root / "model")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """The same patient stored LPS (DICOM-like) in NIfTI and RAS (NIfTI-like) in NRRD."""
    root = tmp_path_factory.mktemp("volumes")
    paths = {}
    for orientation, suffix in (("LPS", ".nii.gz"), ("RAS", ".nrrd")):
        paths[orientation] = root / f"ct_{orientation}{suffix}"
        sitk.WriteImage(phantom_writers.to_sitk_image(_ct(orientation)), str(paths[orientation]))
    return paths


@pytest.fixture(scope="module")
def runs(tiny, volumes, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    outputs = {}
    for orientation, path in volumes.items():
        outputs[orientation] = root / orientation
        argv = ["predict", str(path), "--model", str(tiny[1]), "--slices", SLICES, "--out", str(outputs[orientation])]
        assert cli.main(argv + QUICK) == 0
    return outputs


def _csv(out) -> list[dict]:
    with (out / "boxes.csv").open() as file:
        return list(csv.DictReader(file))


def _json(path):
    return json.loads(path.read_text())


def _answers(out) -> list[dict]:
    """answers.json slices without the timing, which differs from run to run."""
    return [{k: v for k, v in entry.items() if k != "inference_ms"} for entry in _json(out / "answers.json")["slices"]]


def test_csv_markups_and_answers_agree_and_sit_where_the_pixels_are(runs):
    out = runs["LPS"]
    answers = _json(out / "answers.json")["slices"]
    assert [entry["slice"] for entry in answers] == [8, 9, 10]  # --slices 8:11, STOP exclusive
    boxes = [(entry["slice"], box) for entry in answers for box in entry["boxes"]]
    rows, rois = _csv(out), _json(out / "boxes.mrk.json")["markups"]
    assert len(boxes) == len(rows) == len(rois) > 0
    ijk_to_ras = _ct("LPS").ijk_to_ras  # stored LPS: model column/row/slice ARE i/j/k
    for (s, box), row, roi in zip(boxes, rows, rois):
        x0, y0, x1, y1 = box["box"]
        assert int(row["slice"]) == s and row["name"] == roi["name"] == f"pancreas s{s}"
        assert [float(row[k]) for k in ("x_min", "y_min", "x_max", "y_max")] == pytest.approx(box["box"], abs=1e-3)
        assert float(row["confidence"]) == pytest.approx(box["confidence"], abs=1e-4)
        center = (ijk_to_ras @ [(x0 + x1) / 2, (y0 + y1) / 2, s, 1.0])[:3]
        size = [(x1 - x0 + 1) * SPACING[0], (y1 - y0 + 1) * SPACING[1], SPACING[2]]  # pixel extent, one slice
        assert [float(row[f"center_{a}"]) for a in "ras"] == pytest.approx(center, abs=1e-3)
        assert [float(row[f"size_{a}"]) for a in "ras"] == pytest.approx(size, abs=1e-3)
        assert roi["coordinateSystem"] == "LPS"
        assert roi["center"] == pytest.approx([-center[0], -center[1], center[2]], abs=1e-9)
        assert roi["size"] == pytest.approx(size, abs=1e-9)
    summary = _json(out / "summary.json")
    assert summary["slices"] == {"first": 8, "last": 10, "count": 3}
    assert summary["boxes"] == len(rows) and summary["model_view_shape"] == [20, 48, 48]
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == sorted({f"slice_{s:02d}.png" for s, _ in boxes})


def test_file_format_and_orientation_do_not_change_the_answers_or_the_boxes_in_patient_space(runs):
    assert _answers(runs["LPS"]) == _answers(runs["RAS"])
    assert _csv(runs["LPS"]) == _csv(runs["RAS"])


def test_slicer_loads_the_predicted_rois_where_the_csv_says(runs):
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    scene = slicer.vtkMRMLScene()
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    assert logic.LoadMarkups(str(runs["RAS"] / "boxes.mrk.json"), None, slicer.vtkMRMLMessageCollection())
    rows = _csv(runs["RAS"])
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == len(rows)
    for index, row in enumerate(rows):
        node = scene.GetNthNodeByClass(index, "vtkMRMLMarkupsROINode")
        center = [0.0, 0.0, 0.0]
        node.GetCenterWorld(center)
        assert node.GetName() == row["name"]
        assert center == pytest.approx([float(row[f"center_{a}"]) for a in "ras"], abs=1e-3)
        assert node.GetSize() == pytest.approx([float(row[f"size_{a}"]) for a in "ras"], abs=1e-3)


def test_dicom_folder_with_upstream_files_gives_the_same_answers(tiny, runs, tmp_path):
    files, _ = tiny
    phantom_writers.write_nih(tmp_path / "nih", [_ct("LPS")])
    series = {path.parent for path in (tmp_path / "nih").rglob("*.dcm")}
    assert len(series) == 1
    out = tmp_path / "out"
    argv = ["predict", str(series.pop()), "--upstream", str(files.vit_checkpoint), str(files.llama_dir),
            str(files.minigpt_checkpoint), "--image-size", "56", "--slices", "9", "--out", str(out)]
    assert cli.main(argv + QUICK) == 0
    ours, theirs = _answers(out), [entry for entry in _answers(runs["LPS"]) if entry["slice"] == 9]
    # A batch of one and a batch of three differ only in float rounding: compare confidences loosely.
    assert [box.pop("confidence") for box in ours[0]["boxes"]] == pytest.approx(
        [box.pop("confidence") for box in theirs[0]["boxes"]], rel=1e-4)
    assert ours == theirs
    assert _json(out / "summary.json")["model"] == files.minigpt_checkpoint.stem


def _oblique_file(path):
    image = phantom_writers.to_sitk_image(_ct("LPS"))
    angle = np.radians(10.0)  # tilted about the superior axis, like a gantry-rotated acquisition
    image.SetDirection([np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0])
    sitk.WriteImage(image, str(path))


def _write(path, image) -> None:
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("case, message", [
    ("missing", "volume not found"),
    ("garbage", "cannot read"),
    ("2d", "is a 2D image"),
    ("4d", "is a 4D image"),
    ("oblique", "The volume is oblique"),
    ("slices_reversed", "START must be below STOP"),
    ("slices_text", "is not START:STOP"),
    ("slices_past_end", "has 20 axial slices"),
    ("no_model", "model folder not found"),
    ("empty_prompt", "--prompt is empty"),
    ("long_prompt", "--prompt has 2001 characters; at most 2000"),
])
def test_bad_input_is_one_clear_line_and_leaves_the_earlier_output(case, message, tiny, volumes, tmp_path,
                                                                  capsys):
    volume, model, slices = volumes["LPS"], str(tiny[1]), "0:2"
    if case == "garbage":
        volume = tmp_path / "ct.nii.gz"
        volume.write_bytes(b"not an image")
    elif case == "missing":
        volume = tmp_path / "nothing.nii.gz"
    elif case in ("2d", "4d", "oblique"):
        volume = tmp_path / f"{case}.nii.gz"
        plane = sitk.Image([16, 16], sitk.sitkInt16)
        {"2d": lambda: _write(volume, plane),
         "4d": lambda: _write(volume, sitk.JoinSeries([sitk.JoinSeries([plane, plane])] * 2)),
         "oblique": lambda: _oblique_file(volume)}[case]()
    elif case.startswith("slices"):
        slices = {"slices_reversed": "5:2", "slices_text": "a:b", "slices_past_end": "10:99"}[case]
    elif case == "no_model":
        model = str(tmp_path / "no-model")
    extra = {"empty_prompt": ["--prompt", " "], "long_prompt": ["--prompt", "[refer] " + "x" * 1993]}.get(case, [])
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"command": "minigpt-pancreas predict"}))  # an earlier output
    before = sorted(tmp_path.iterdir())
    assert cli.main(["predict", str(volume), "--model", model, "--slices", slices, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == before  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["summary.json"]


def test_a_gantry_tilted_volume_is_resampled_on_request_and_the_outputs_say_so(tiny, runs, tmp_path, capsys):
    image = phantom_writers.to_sitk_image(_ct("LPS"))
    angle = np.radians(3.0)  # a gantry tilt: slices turned about the patient's left-right axis
    image.SetDirection([1.0, 0.0, 0.0, 0.0, np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle)])
    tilted = tmp_path / "tilted.nii.gz"
    sitk.WriteImage(image, str(tilted))
    argv = ["predict", str(tilted), "--model", str(tiny[1]), "--slices", SLICES, *QUICK]
    assert cli.main([*argv, "--out", str(tmp_path / "refused")]) == 2
    assert "--resample" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    out = tmp_path / "resampled"
    assert cli.main([*argv, "--out", str(out), "--resample"]) == 0
    assert "note: the volume was tilted" in capsys.readouterr().err
    summary = _json(out / "summary.json")
    assert summary["resampled"].startswith("tilted (up to 1.") and "nearest axial grid" in summary["resampled"]
    assert summary["model_view_shape"] == [20, 48, 48]  # the same voxel counts on the axis-aligned grid
    assert _json(runs["LPS"] / "summary.json")["resampled"] is None  # an axial volume is used as it is
    rows = _csv(out)
    assert rows and {int(row["slice"]) for row in rows} <= {8, 9, 10}


def test_a_folder_that_is_not_an_earlier_output_is_never_replaced(tiny, volumes, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    argv = ["predict", str(volumes["LPS"]), "--model", str(tiny[1]), "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "holds files minigpt-pancreas predict did not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_writers_with_hand_made_answers_on_a_coronal_stored_volume(tmp_path):
    """Several boxes on one slice, labelled boxes, yes/no and plain-text answers, on a volume whose model view
    is a real permutation of its voxel axes (stored as coronal slices)."""
    ct = _ct("LSP")
    view = geometry.ModelView.from_volume(ct.hu, ct.ijk_to_ras)
    results = [
        (3, SliceResult("{<10><20><30><40>}<delim>{<50><50><60><70>}", "boxes",
                        (DetectedBox((4.0, 9.5, 14.0, 19.0), None, 0.8), DetectedBox((24.0, 24.0, 29.0, 33.5),
                                                                                      None, 0.6)),
                        False, None, None, None, 12.0)),
        (4, SliceResult("<p>tumor</p> {<10><10><20><20>}", "boxes", (DetectedBox((5.0, 5.0, 9.0, 9.0), "tumor",
                                                                                0.9),), False, None, None, None,
                        12.0)),
        (5, SliceResult("yes", "yes_no", (), False, True, 0.75, None, 12.0)),
        (6, SliceResult("hmm", "text", (), False, None, None, "no box and no yes/no in the answer", 12.0)),
    ]
    details = {"command": "minigpt-pancreas predict", "prompt": "[refer] pancreas", "image_variant": "window",
               "model": "hand-made"}
    summary = write_outputs(tmp_path, view, results, label="pancreas", details=details, seconds=1.0)

    rows, rois = _csv(tmp_path), _json(tmp_path / "boxes.mrk.json")["markups"]
    assert [row["name"] for row in rows] == [roi["name"] for roi in rois] == [
        "pancreas s3-1", "pancreas s3-2", "tumor s4"]
    expected = [(3, (4.0, 9.5, 14.0, 19.0)), (3, (24.0, 24.0, 29.0, 33.5)), (4, (5.0, 5.0, 9.0, 9.0))]
    for (s, box), row, roi in zip(expected, rows, rois):
        center, size = view.box_to_ras(box, s)
        assert [float(row[f"center_{a}"]) for a in "ras"] == pytest.approx(center, abs=1e-3)
        assert roi["center"] == pytest.approx([-center[0], -center[1], center[2]])
        assert roi["size"] == pytest.approx(size) and size[2] == pytest.approx(SPACING[1])  # j is S-I here
    answers = _json(tmp_path / "answers.json")["slices"]
    assert answers[2] == {"slice": 5, "answer": "yes", "kind": "yes_no", "boxes": [], "absent": False, "yes": True,
                          "yes_probability": 0.75, "reason": None, "inference_ms": 12.0}
    assert answers[1]["boxes"] == [{"box": [5.0, 5.0, 9.0, 9.0], "label": "tumor", "confidence": 0.9}]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["slice_03.png", "slice_04.png"]
    assert summary["answers_by_kind"] == {"boxes": 2, "text": 1, "yes_no": 1}
    assert (summary["boxes"], summary["slices_with_boxes"], summary["yes_answers"]) == (3, 2, 1)
