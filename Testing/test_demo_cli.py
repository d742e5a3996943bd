"""The main job (`minigpt-pancreas demo`) and the backend CLI, run as a user runs them: the bundled demo model
answers the cascade's questions about a synthetic CT it never saw."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend import cli
from backend.demo_model import bundled_model_dir, model_card

pytestmark = pytest.mark.slow


def _run_demo(out, *extra: str) -> int:
    return cli.main(["demo", "--out", str(out), *extra])


def _read_rows(out) -> list[dict]:
    with (out / "boxes.csv").open() as f:
        return list(csv.DictReader(f))


def test_help_lists_the_commands_without_error():
    result = subprocess.run([sys.executable, "-m", "backend.cli", "--help"], capture_output=True, encoding="utf-8",
                            errors="replace")
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "minigpt-pancreas" in result.stdout


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo on one seed stored two ways: LPS (DICOM-like) and RAS (NIfTI-like)."""
    root = tmp_path_factory.mktemp("demo")
    outputs = {}
    for orientation in ("LPS", "RAS"):
        outputs[orientation] = root / orientation
        assert _run_demo(outputs[orientation], "--seed", "3", "--orientation", orientation) == 0
    return outputs


def test_demo_answers_with_the_bundled_model_and_writes_every_promised_output(demo_runs):
    out = demo_runs["RAS"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model_card(bundled_model_dir())["model_id"] and summary["synthetic_model"]
    assert Path(summary["volume"]) == (out / "phantom_ct.nii.gz").absolute()  # where it is, not where it was staged
    for name in ("phantom_ct.nii.gz", "phantom_labels.nii.gz", "boxes.csv", "boxes.mrk.json", "answers.json"):
        assert (out / name).is_file()
    answers = json.loads((out / "answers.json").read_text())["slices"]
    assert len(answers) == summary["model_view_shape"][0]  # every slice was asked
    assert all(0.0 <= a["tumour_yes_no"]["yes_probability"] <= 1.0 for a in answers)
    assert all((a["tumour"] is not None) == bool(a["tumour_yes_no"]["yes"]) for a in answers)
    names = {row["name"].split()[0] for row in _read_rows(out)}
    assert "pancreas" in names
    assert list((out / "overlays").glob("*.png"))
    markups = json.loads((out / "boxes.mrk.json").read_text())["markups"]
    assert all(summary["model"] in roi["controlPoints"][0]["description"] for roi in markups)


def test_every_slice_gets_a_readable_pancreas_box_and_a_scored_tumour_answer(demo_runs):
    summary = json.loads((demo_runs["RAS"] / "summary.json").read_text())
    scores = summary["scores"]
    assert summary["pancreas_boxes"] == summary["model_view_shape"][0]  # the grammar was kept on every slice
    assert scores["pancreas_slices"] > 0 and 0.0 <= scores["pancreas_iou"] <= 1.0
    assert scores["tumour_yes_no_accuracy"] is not None


def test_file_orientation_does_not_change_the_answers_in_patient_space(demo_runs):
    lps, ras = _read_rows(demo_runs["LPS"]), _read_rows(demo_runs["RAS"])
    assert len(lps) == len(ras) > 0
    millimetres = [f"{kind}_{axis}" for kind in ("center", "size") for axis in "ras"]
    for row_lps, row_ras in zip(lps, ras):
        # Same slices, answers and pixels. The millimetres, printed to 0.001, may differ in the last digit where
        # a value lies on a rounding boundary: the two storages reach it by different float sums.
        pixels = [{k: v for k, v in row.items() if k not in millimetres} for row in (row_lps, row_ras)]
        assert pixels[0] == pixels[1]
        np.testing.assert_allclose([float(row_lps[k]) for k in millimetres], [float(row_ras[k]) for k in millimetres],
                                   rtol=0, atol=0.0011)


def test_the_first_line_names_the_model_and_the_last_the_next_steps(tmp_path, capsys):
    assert _run_demo(tmp_path / "out", "--seed", "5") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "bundled demo model" in lines[0] and "not for clinical use" in lines[0]
    assert "3D Slicer" in lines[-1] and "minigpt-pancreas serve" in lines[-1]


def test_a_failed_run_keeps_the_previous_output_and_says_why(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run_demo(out, "--seed", "1") == 0
    before = (out / "summary.json").read_bytes()
    assert _run_demo(out, "--seed", "1", "--orientation", "XYZ") == 2  # fails inside the job
    assert "orientation" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
