"""Slice PNGs and records: orientation, boxes and the paper's key rules, checked against the phantoms.

The expected model view is computed here independently of `geometry.ModelView`: every voxel's RAS position
gives its pixel (column 0 = the patient's rightmost voxel, row 0 = the most anterior, slice 0 = the most
inferior), so a wrong flip or transpose anywhere in the pipeline shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from SlicerMiniGPTPancreas.phantom import KIDNEY_LEFT, KIDNEY_RIGHT, ORIENTATIONS, make_phantom, reorient
from SlicerMiniGPTPancreas.phantom_writers import write_abdomenct1k, write_msd
from SlicerMiniGPTPancreas.preprocess import hu_slice_to_rgb
from training.prepare.discovery import discover
from training.prepare.files import read_json
from training.prepare.records import mask_stats, volume_records
from training.prepare.volume_job import VolumeSettings, prepare_volume

# Anisotropic on purpose: every storage axis has its own spacing. The in-plane field of view is the default
# 288 mm, wide enough to hold the liver, spleen and spine of any phantom patient (they vary in size and place).
BASE = make_phantom(5, size_mm=(288.0, 288.0, 80.0), spacing=(4.5, 6.0, 5.0), orientation="LPS")


def expected_view(phantom, array: np.ndarray) -> np.ndarray:
    """[S, R, C] model view of `array` [k, j, i], placed by each voxel's RAS coordinates."""
    k, j, i = np.indices(array.shape).reshape(3, -1)
    ras = phantom.ijk_to_ras_points(np.stack([i, j, k], axis=1))  # [N, 3]
    step = np.abs(phantom.ijk_to_ras[:3, :3]).max(axis=1)  # mm per voxel along R-L, A-P, S-I
    column = np.rint((ras[:, 0].max() - ras[:, 0]) / step[0]).astype(int)  # patient right -> left
    row = np.rint((ras[:, 1].max() - ras[:, 1]) / step[1]).astype(int)  # anterior -> posterior
    section = np.rint((ras[:, 2] - ras[:, 2].min()) / step[2]).astype(int)  # inferior -> superior
    view = np.zeros((section.max() + 1, row.max() + 1, column.max() + 1), array.dtype)
    view[section, row, column] = array.ravel()
    return view


def expected_boxes(mask_view: np.ndarray) -> list[list[int]]:
    boxes = []
    for mask in mask_view:
        rows, cols = np.nonzero(mask)
        boxes.append([int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())] if rows.size else [0, 0, 0, 0])
    return boxes


def _prepare(root: Path, dataset: str, out: Path) -> list[list[dict]]:
    found = discover(dataset, root)
    for source in found.sources:
        assert prepare_volume(source, str(out), VolumeSettings()).status == "prepared"
    return [read_json(out / dataset / "records" / f"{s.volume}.json") for s in found.sources]


@pytest.fixture(scope="module")
def msd_orientations(tmp_path_factory):
    """The same patient stored in all six orientations, prepared from MSD NIfTI files."""
    root, out = tmp_path_factory.mktemp("msd"), tmp_path_factory.mktemp("out")
    phantoms = [reorient(BASE, code) for code in ORIENTATIONS]
    write_msd(root, phantoms)
    return phantoms, _prepare(root, "msd", out), out


@pytest.mark.parametrize("index", range(len(ORIENTATIONS)), ids=ORIENTATIONS)
def test_boxes_and_pngs_match_the_phantom_in_every_orientation(msd_orientations, index):
    phantoms, all_records, out = msd_orientations
    phantom, records = phantoms[index], all_records[index]
    labels = expected_view(phantom, phantom.labels)  # [S, R, C]
    hu = expected_view(phantom, phantom.hu)
    assert [r["slice_count"] for r in records] == [labels.shape[0]] * labels.shape[0]
    assert [r["bbox_pancreas"] for r in records] == expected_boxes(labels > 0)
    assert [r["bbox_tumor"] for r in records] == expected_boxes(labels == 2)
    assert [r["pixels_pancreas"] for r in records] == [int(n) for n in (labels > 0).sum(axis=(1, 2))]
    assert {(r["width"], r["height"]) for r in records} == {(labels.shape[2], labels.shape[1])}
    for s in (0, labels.shape[0] // 2, labels.shape[0] - 1):
        png = np.asarray(Image.open(out / records[s]["image"]))
        assert png.shape == (labels.shape[1], labels.shape[2], 3)  # 8-bit RGB
        np.testing.assert_array_equal(png, hu_slice_to_rgb(hu[s]))
    # the record points back at the file's voxels: the stored axis that runs inferior-superior
    axis = "ijk"[[letter in "SI" for letter in phantom.orientation].index(True)]
    assert {r["source_voxel_index"]["axis"] for r in records} == {axis}


def test_same_anatomy_in_the_same_place_whatever_the_file_orientation(msd_orientations):
    _, all_records, out = msd_orientations
    reference = all_records[0]
    for records in all_records[1:]:
        assert [r["bbox_pancreas"] for r in records] == [r["bbox_pancreas"] for r in reference]
        assert [r["content_hash"] for r in records] == [r["content_hash"] for r in reference]
        for s in range(0, len(records), 4):
            assert (out / records[s]["image"]).read_bytes() == (out / reference[s]["image"]).read_bytes()


def test_anterior_is_up_and_patient_right_is_image_left(tmp_path):
    write_abdomenct1k(tmp_path / "abd", [reorient(BASE, "RAS")])
    records = _prepare(tmp_path / "abd", "abdomenct1k", tmp_path / "out")[0]
    liver = [r for r in records if r["pixels_liver"]]
    spleen = [r for r in records if r["pixels_spleen"]]
    assert np.mean([(r["bbox_liver"][0] + r["bbox_liver"][2]) / 2 for r in liver]) < records[0]["width"] / 2
    assert np.mean([(r["bbox_spleen"][0] + r["bbox_spleen"][2]) / 2 for r in spleen]) > records[0]["width"] / 2
    middle = max(records, key=lambda r: r["pixels_pancreas"])
    png = np.asarray(Image.open(tmp_path / "out" / middle["image"]))[:, :, 0]
    bone_row = np.nonzero(png == 255)[0].mean()  # the spine (HU above the window) lies posterior
    pancreas_row = (middle["bbox_pancreas"][1] + middle["bbox_pancreas"][3]) / 2
    assert bone_row > pancreas_row  # posterior = further down the image


@pytest.mark.parametrize("orientation", ["LPS", "ASL"])
def test_abdomenct1k_kidneys_are_told_apart_by_patient_side(tmp_path, orientation):
    phantom = reorient(BASE, orientation)
    write_abdomenct1k(tmp_path / "abd", [phantom], nested=False)
    records = _prepare(tmp_path / "abd", "abdomenct1k", tmp_path / "out")[0]
    sides = expected_view(phantom, phantom.kidney_sides)
    organs = expected_view(phantom, phantom.organs)
    assert [r["bbox_right_kidney"] for r in records] == expected_boxes(sides == KIDNEY_RIGHT)
    assert [r["bbox_left_kidney"] for r in records] == expected_boxes(sides == KIDNEY_LEFT)
    assert [r["bbox_kidney"] for r in records] == [r["bbox_right_kidney"] for r in records]  # upstream's meaning
    for organ, label in (("liver", 1), ("spleen", 3), ("pancreas", 4)):
        assert [r[f"bbox_{organ}"] for r in records] == expected_boxes(organs == label)
    assert records[0]["dataset"] == "ABD" and records[0]["volume_name"] == "Case_00001_0000.nii.gz"


def test_paper_keys_follow_the_upstream_rules_on_a_hand_made_volume():
    labels = np.zeros((4, 6, 8), np.uint8)  # [S, R, C]
    labels[1, 1:4, 2:6] = 1  # 12 px, box [2, 1, 5, 3], area 3 * 2 = 6
    labels[1, 1, 2] = 2  # one tumour pixel: box [2, 1, 2, 1], area 0
    labels[2, 0:5, 3] = 1  # a one-pixel-wide line: area 0 (no +1, as upstream)
    labels[3, 0, 0] = labels[3, 5, 7] = 1  # two corners: box [0, 0, 7, 5], area 35
    stats = {"pancreas": mask_stats(labels > 0), "tumor": mask_stats(labels == 2)}
    extra = [{} for _ in range(4)]
    records = volume_records("msd", "pancreas_042.nii.gz", labels.shape, stats, extra)
    assert list(records[1])[:19] == [
        "dataset", "volume_name", "slice_id", "slice_index", "slice_count", "pixels_pancreas",
        "pancreas_pixels_ratio", "max_pixels_pancreas", "pixels_tumor", "tumor_pixels_ratio", "max_pixels_tumor",
        "bbox_pancreas", "pancreas_bbox_ratio", "max_bbox_pancreas", "bbox_tumor", "tumor_bbox_ratio",
        "max_bbox_tumor", "width", "height"]
    assert [r["bbox_pancreas"] for r in records] == [[0, 0, 0, 0], [2, 1, 5, 3], [3, 0, 3, 4], [0, 0, 7, 5]]
    assert [r["pixels_pancreas"] for r in records] == [0, 12, 5, 2]
    assert [r["pancreas_pixels_ratio"] for r in records] == [0.0, 1.0, 0.42, 0.17]
    assert [r["pancreas_bbox_ratio"] for r in records] == [0.0, 0.17, 0.0, 1.0]  # 6/35, 0/35, 35/35
    assert records[0]["max_bbox_pancreas"] == 35 and records[0]["max_pixels_pancreas"] == 12
    assert records[1]["bbox_tumor"] == [2, 1, 2, 1] and records[1]["pixels_tumor"] == 1
    assert records[1]["tumor_bbox_ratio"] == 0.0 and records[1]["max_bbox_tumor"] == 0  # area 0 everywhere
    assert (records[1]["width"], records[1]["height"], records[1]["dataset"]) == (8, 6, "MSD")


def test_a_label_off_the_ct_grid_is_refused_unless_paired_by_index(tmp_path):
    import SimpleITK as sitk

    write_msd(tmp_path / "msd", [BASE])
    label_file = tmp_path / "msd" / "Task07_Pancreas" / "labelsTr" / "pancreas_001.nii.gz"
    label = sitk.ReadImage(str(label_file))
    label.SetOrigin(tuple(np.add(label.GetOrigin(), (0.0, 0.0, 20.0))))  # 4 slices off
    sitk.WriteImage(label, str(label_file))
    source = discover("msd", tmp_path / "msd").sources[0]
    outcome = prepare_volume(source, str(tmp_path / "out"), VolumeSettings())
    assert outcome.status == "failed"
    assert "pancreas_001.nii.gz does not lie on the CT's voxel grid" in outcome.problem.message
    assert "20.00 mm" in outcome.problem.message and "--label-geometry image" in outcome.problem.message
    assert not (tmp_path / "out" / "msd" / "records").exists()
    paired = prepare_volume(source, str(tmp_path / "out"), VolumeSettings(label_geometry="image"))
    assert paired.status == "prepared"
    records = read_json(tmp_path / "out" / "msd" / "records" / "pancreas_001.json")
    assert [r["bbox_pancreas"] for r in records] == expected_boxes(expected_view(BASE, BASE.labels) > 0)
