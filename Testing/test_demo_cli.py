"""The main job (`minigpt-pancreas demo`) and the backend CLI, run as a user runs them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from backend import cli, demo
from SlicerMiniGPTPancreas import phantom

pytestmark = pytest.mark.slow


def _run_demo(out, *extra: str) -> int:
    return cli.main(["demo", "--out", str(out), *extra])


def _read_rows(out) -> list[dict]:
    with (out / "boxes_ras.csv").open() as f:
        return list(csv.DictReader(f))


def test_help_lists_the_commands_without_error():
    result = subprocess.run([sys.executable, "-m", "backend.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "minigpt-pancreas" in result.stdout


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo on the same seed stored two ways: LPS (DICOM-like) and RAS (NIfTI-like)."""
    root = tmp_path_factory.mktemp("demo")
    outputs = {}
    for orientation in ("LPS", "RAS"):
        outputs[orientation] = root / orientation
        assert _run_demo(outputs[orientation], "--seed", "3", "--orientation", orientation) == 0
    return outputs


def test_demo_writes_every_promised_output(demo_runs):
    out = demo_runs["RAS"]
    summary = json.loads((out / "summary.json").read_text())
    rows = _read_rows(out)
    assert summary["slices_with_pancreas"] == len(rows) > 0
    assert len(list((out / "slices").glob("*.png"))) == len(rows)
    assert all((out / name).is_file() for name in summary["overlays"])
    assert "no trained demo model" in summary["answer_source"]  # it says honestly what produced the answers


def test_file_orientation_does_not_change_the_boxes_in_patient_space(demo_runs):
    lps, ras = _read_rows(demo_runs["LPS"]), _read_rows(demo_runs["RAS"])
    assert len(lps) == len(ras) > 0
    millimetres = [f"{kind}_{axis}" for kind in ("center", "size") for axis in "ras"]
    for row_lps, row_ras in zip(lps, ras):
        # Same slices, answers and pixels. The millimetres, printed to 0.01, may differ by one unit in the last
        # digit where a value lies on a rounding boundary: the two storages reach it by different float sums.
        pixels = [{k: v for k, v in row.items() if k not in millimetres} for row in (row_lps, row_ras)]
        assert pixels[0] == pixels[1]
        np.testing.assert_allclose([float(row_lps[k]) for k in millimetres], [float(row_ras[k]) for k in millimetres],
                                   rtol=0, atol=0.0101)


def test_ras_boxes_match_the_phantom_pancreas_computed_independently(demo_runs):
    ct = phantom.make_phantom(seed=3, orientation="RAS", tumour=True,
                              size_mm=demo.DEMO_SIZE_MM, spacing=demo.DEMO_SPACING_MM)
    k, j, i = np.nonzero(np.isin(ct.labels, (1, 2)))
    ras = (ct.ijk_to_ras @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T  # [N, 3] voxel centres
    half_voxel = np.abs(ct.ijk_to_ras[:3, :3]).sum(axis=1) / 2  # [3] mm, axis-aligned
    grid_cell_mm = demo.DEMO_SIZE_MM[0] / 100  # the answer grid's resolution bounds the error
    for row in _read_rows(demo_runs["RAS"]):
        in_slice = np.abs(ras[:, 2] - float(row["center_s"])) < half_voxel[2]
        low, high = ras[in_slice].min(axis=0) - half_voxel, ras[in_slice].max(axis=0) + half_voxel
        center = np.array([float(row[f"center_{a}"]) for a in "ras"])
        size = np.array([float(row[f"size_{a}"]) for a in "ras"])
        np.testing.assert_allclose(center[:2], ((low + high) / 2)[:2], atol=grid_cell_mm)
        np.testing.assert_allclose(size[:2], (high - low)[:2], atol=grid_cell_mm)
        assert size[2] == pytest.approx(demo.DEMO_SPACING_MM[2])


def test_cell_centre_decoding_beats_upstream_floor(tmp_path, demo_runs):
    assert _run_demo(tmp_path / "floor", "--seed", "3", "--decode", "floor") == 0
    floor_iou = json.loads((tmp_path / "floor" / "summary.json").read_text())["mean_iou"]
    centre_iou = json.loads((demo_runs["RAS"] / "summary.json").read_text())["mean_iou"]
    assert centre_iou > floor_iou + 0.03


def test_a_failed_run_keeps_the_previous_output_and_says_why(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run_demo(out, "--seed", "1") == 0
    before = (out / "summary.json").read_bytes()
    assert _run_demo(out, "--seed", "-1") == 2  # an invalid seed fails inside the job
    assert "error" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
