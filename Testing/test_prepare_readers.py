"""`prepare` discovery and readers on phantom datasets written in the three shipped layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from SlicerMiniGPTPancreas.phantom import make_phantom, reorient
from SlicerMiniGPTPancreas.phantom_writers import write_abdomenct1k, write_msd, write_nih
from training.prepare.discovery import discover
from training.prepare.files import PrepareError, VolumeError
from training.prepare.readers import read_dicom_series, read_image, read_label, read_nifti
from broken_files import write_apple_doubles, write_corrupt_file

SMALL = {"size_mm": (120.0, 120.0, 60.0), "spacing": (4.0, 4.0, 5.0)}


def _phantom(seed: int, orientation: str = "LPS", **kwargs):
    return make_phantom(seed, orientation=orientation, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def nih_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih") / "Pancreas-CT"  # case folders one level deeper than the root
    write_nih(root, [_phantom(1)], shuffle_names=True, depth="date", case_ids=[1])  # slope 1, intercept -1024
    write_nih(root, [_phantom(2, spacing=(3.0, 4.0, 2.5))], shuffle_names=True, slope=2.0, intercept=-2048.0,
              depth="uid", pixel_type="uint16", case_ids=[3])
    return root.parent


def _series_files(root: Path, case: str) -> list[Path]:
    return sorted((root / "Pancreas-CT" / case).rglob("*.dcm"))


def test_dicom_series_is_sorted_by_position_and_rescaled_to_hu(nih_root):
    phantom = reorient(_phantom(2, spacing=(3.0, 4.0, 2.5)), "LPS")  # the writer stores axial LPS
    volume = read_dicom_series(nih_root / "Pancreas-CT" / "PANCREAS_0003")
    # slope 2 stores round((HU + 2048) / 2): every HU comes back within one unit, odd values rounded
    assert volume.array.shape == phantom.hu.shape
    assert np.abs(volume.array.astype(int) - phantom.hu).max() <= 1
    assert np.mean(volume.array == phantom.hu) > 0.4  # rescale applied, not the raw stored values
    np.testing.assert_allclose(volume.ijk_to_ras, phantom.ijk_to_ras, atol=1e-4)
    # the file of slice k is the one whose position is k-th from inferior
    import pydicom

    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.slice_files]
    assert z == sorted(z) and len(z) == phantom.hu.shape[0]


def test_shuffled_names_do_not_change_the_order(nih_root):
    files = _series_files(nih_root, "PANCREAS_0001")
    by_name = sorted(files, key=lambda p: int(p.stem.split("-")[1]))
    volume = read_dicom_series(nih_root / "Pancreas-CT" / "PANCREAS_0001")
    assert [Path(f) for f in volume.slice_files] != by_name  # the writer shuffled the names
    np.testing.assert_array_equal(volume.array, reorient(_phantom(1), "LPS").hu)


def test_missing_dicom_slice_is_reported_with_its_neighbours(nih_root, tmp_path):
    case = tmp_path / "PANCREAS_0001"
    shutil.copytree(nih_root / "Pancreas-CT" / "PANCREAS_0001", case)
    volume = read_dicom_series(case)
    Path(volume.slice_files[5]).unlink()
    with pytest.raises(VolumeError, match="slice is missing") as caught:
        read_dicom_series(case)
    assert Path(volume.slice_files[4]).name in str(caught.value)


@pytest.mark.parametrize("keep_bytes", [200, 700, -300])  # in the file meta, in the header, in the pixels
def test_corrupt_dicom_file_is_named(nih_root, tmp_path, keep_bytes):
    case = tmp_path / "PANCREAS_0001"
    shutil.copytree(nih_root / "Pancreas-CT" / "PANCREAS_0001", case)
    victim = sorted(case.rglob("*.dcm"))[3]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])
    with pytest.raises(VolumeError) as caught:
        read_dicom_series(case)
    assert victim.name in str(caught.value)


def test_nifti_reader_names_a_corrupt_or_missing_file(tmp_path):
    corrupt = write_corrupt_file(tmp_path / "pancreas_009.nii.gz")
    with pytest.raises(VolumeError, match="pancreas_009.nii.gz.*corrupt"):
        read_nifti(str(corrupt))
    with pytest.raises(VolumeError, match="does not exist"):
        read_nifti(str(tmp_path / "nothing.nii.gz"))


def test_msd_discovery_skips_macos_files_and_reports_a_missing_label(tmp_path):
    task = write_msd(tmp_path, [_phantom(1), _phantom(2)], case_ids=[4, 17])
    write_apple_doubles(task)
    (task / "labelsTr" / "pancreas_017.nii.gz").unlink()
    found = discover("msd", tmp_path)
    assert [s.volume for s in found.sources] == ["pancreas_004"]
    assert found.sources[0].volume_name == "pancreas_004.nii.gz"
    assert [p.volume for p in found.problems] == ["pancreas_017"]
    assert "pancreas_017.nii.gz" in found.problems[0].path
    # the label reader gives MSD's ids, geometry equal to the image's
    image, label = read_image(found.sources[0]), read_label(found.sources[0].label, (0, 1, 2))
    assert set(np.unique(label.array)) == {0, 1, 2}
    np.testing.assert_allclose(label.ijk_to_ras, image.ijk_to_ras)


def test_label_with_unexpected_ids_is_refused(tmp_path):
    task = write_msd(tmp_path, [_phantom(1)])
    with pytest.raises(VolumeError, match=r"label ids \[2\]"):
        read_label(str(task / "labelsTr" / "pancreas_001.nii.gz"), (0, 1))


def test_nih_discovery_any_depth_and_withdrawn_cases(nih_root):
    labels = nih_root / "Pancreas-CT" / "TCIA_pancreas_labels-02-05-2017"
    shutil.copy(labels / "label0001.nii.gz", labels / "label0025.nii.gz")  # withdrawn by TCIA: a note
    shutil.copy(labels / "label0001.nii.gz", labels / "label0040.nii.gz")  # a real gap: a problem
    try:
        found = discover("nih", nih_root)
    finally:
        (labels / "label0025.nii.gz").unlink()
        (labels / "label0040.nii.gz").unlink()
    assert [(s.volume, s.volume_name) for s in found.sources] == [("PANCREAS_0001", "label0001.nii.gz"),
                                                                  ("PANCREAS_0003", "label0003.nii.gz")]
    assert [p.volume for p in found.problems] == ["PANCREAS_0040"]
    assert any("label0025" in note and "withdrew" in note for note in found.notes)


@pytest.mark.parametrize("nested, masks_folder", [(True, "Mask"), (False, "Masks")])
def test_abdomenct1k_discovery_in_both_layouts(tmp_path, nested, masks_folder):
    write_abdomenct1k(tmp_path, [_phantom(1), _phantom(2)], nested=nested, masks_folder=masks_folder,
                      case_ids=[7, 512])
    # AbdomenCT-1K ships more images than masks: an image without a mask is a note, not a problem
    extra = next(tmp_path.rglob("Case_00007_0000.nii.gz"))
    shutil.copy(extra, extra.with_name("Case_00900_0000.nii.gz"))
    found = discover("abdomenct1k", tmp_path)
    assert [s.volume for s in found.sources] == ["Case_00007_0000", "Case_00512_0000"]
    assert Path(found.sources[1].image).parent.name.endswith("ImagePart2")
    assert Path(found.sources[1].label).parent.name == masks_folder
    assert not found.problems and "Case_00900_0000.nii.gz" in found.notes[0]


def test_a_bad_root_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        discover("msd", tmp_path / "nope")
    with pytest.raises(PrepareError, match="No msd volumes found.*imagesTr"):
        discover("msd", tmp_path)


def test_other_series_and_reports_in_the_case_folder_are_ignored(nih_root, tmp_path):
    import pydicom

    case = tmp_path / "PANCREAS_0001"
    shutil.copytree(nih_root / "Pancreas-CT" / "PANCREAS_0001", case)
    files = sorted(case.rglob("*.dcm"))
    localizer = pydicom.dcmread(files[0])
    localizer.SeriesInstanceUID = "1.2.3.4.5"  # a one-slice scout series next to the CT
    localizer.save_as(case / "scout.dcm")
    report = pydicom.dcmread(files[1])
    report.SeriesInstanceUID = "1.2.3.4.6"
    del report.ImagePositionPatient  # a dose report: no image geometry, another series
    report.save_as(case / "dose.dcm")
    volume = read_dicom_series(case)
    assert len(volume.slice_files) == len(files) and str(case / "scout.dcm") not in volume.slice_files
    np.testing.assert_array_equal(volume.array, reorient(_phantom(1), "LPS").hu)


def test_rescale_is_applied_here_when_the_reader_returned_stored_values(nih_root):
    """The fallback of `_ensure_rescaled`: given the raw stored values, every file's slope/intercept is applied."""
    import pydicom

    from training.prepare.readers import _ensure_rescaled, _series_headers

    headers = _series_headers(nih_root / "Pancreas-CT" / "PANCREAS_0003")
    headers.sort(key=lambda h: h.position[2])
    stored = np.stack([pydicom.dcmread(h.path).pixel_array for h in headers])  # uint16 [K, J, I]
    hu = _ensure_rescaled(stored, headers)
    np.testing.assert_array_equal(hu, stored.astype(np.float32) * 2.0 - 2048.0)
    assert _ensure_rescaled(hu, headers) is hu  # already HU: left alone
