"""Reading the volume `predict` answers about: files and DICOM series that would give silently wrong answers (a
truncated file, a series with a missing, damaged or repeated slice, slices of two sizes, a nonsense voxel spacing,
NaN voxels) are refused with one line that says what is wrong, before the model loads. The files are real: written
by SimpleITK, then cut short or written with the bad geometry."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk

from backend import cli
from backend.commands import predict
from backend.volume_files import read_volume
from SlicerMiniGPTPancreas.errors import UserError

SHAPE_KJI = (6, 16, 16)
VOXELS = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI) - 700  # no zero runs: cuts show


def _image(array=VOXELS, spacing=(0.8, 0.8, 2.5)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _write(path, image=None, compress=False):
    sitk.WriteImage(_image() if image is None else image, str(path), compress)
    return path


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _refusal(path, series=None) -> str:
    with pytest.raises(UserError) as refused:
        read_volume(path, series)
    message = str(refused.value)
    assert "\n" not in message
    return message


# --- truncated files ---------------------------------------------------------------------------------------------

NIFTI_BYTES = 352 + VOXELS.nbytes  # header and extension flag, then the voxels


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_a_truncated_nifti_is_refused_with_the_bytes_it_lacks(tmp_path, name):
    path = _write(tmp_path / name)
    _cut(path)
    message = _refusal(path)
    assert f"{path} is truncated" in message and f"of the {NIFTI_BYTES:,} bytes its header announces" in message
    assert "not fully copied" in message


@pytest.mark.parametrize("name, compress", [("ct.nrrd", False), ("ct.nrrd", True), ("ct.nhdr", False),
                                            ("ct.nhdr", True), ("ct.mha", False), ("ct.mha", True),
                                            ("ct.mhd", False), ("ct.mhd", True)])
def test_truncated_nrrd_and_metaimage_data_is_named_as_truncated(tmp_path, name, compress):
    header = _write(tmp_path / name, compress=compress)
    data = [path for path in tmp_path.iterdir() if path != header]  # .nhdr/.mhd: the detached data file
    _cut(data[0] if data else header)
    assert "is truncated" in _refusal(header)
    if data:
        assert f"(the data file of {header})" in _refusal(header)


@pytest.mark.parametrize("name, compress", [("ct.nii.gz", True), ("ct.nii", False), ("ct.nrrd", True),
                                            ("ct.nhdr", False), ("ct.mha", True), ("ct.mhd", False)])
def test_complete_files_read_with_their_voxels(tmp_path, name, compress):
    image = read_volume(_write(tmp_path / name, compress=compress))
    assert np.array_equal(sitk.GetArrayFromImage(image), VOXELS)


def _write_big_endian_nifti(path, array: np.ndarray, spacing) -> None:
    """A big-endian NIfTI-1 file of int16 `array`, as some scanners' tools write: ITK reads it, never writes it."""
    header = bytearray(348)
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into(">hh", header, 70, 4, 16)  # datatype int16, bitpix
    struct.pack_into(">8fff", header, 76, 1.0, *spacing, 0, 0, 0, 0, 352.0, 1.0)  # pixdim, vox_offset, scl_slope
    header[123] = 2  # xyzt_units: mm
    struct.pack_into(">hh", header, 252, 0, 1)  # qform_code, sform_code: the srows hold the affine
    for row, size in enumerate(spacing):
        struct.pack_into(">4f", header, 280 + 16 * row, *(size if col == row else 0.0 for col in range(4)))
    header[344:348] = b"n+1\0"
    path.write_bytes(bytes(header) + bytes(4) + array.astype(">i2").tobytes())


def test_a_big_endian_nifti_is_read_whole_and_refused_cut(tmp_path):
    path = tmp_path / "ct.nii"
    _write_big_endian_nifti(path, VOXELS, (0.8, 0.8, 2.5))
    assert np.array_equal(sitk.GetArrayFromImage(read_volume(path)), VOXELS)
    _cut(path, keep=0.9)
    assert f"of the {NIFTI_BYTES:,} bytes its header announces" in _refusal(path)


# --- DICOM series ------------------------------------------------------------------------------------------------

def _write_series(folder, positions, sizes=None):
    """One CT series, a file per slice at z = `positions` (mm), slices of `sizes` (rows, columns), as DICOM files
    written by SimpleITK; the file names run against the slice order, as on many exports."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, z in enumerate(positions):
        rows, columns = (sizes or {}).get(index, (16, 16))
        image = sitk.GetImageFromArray(np.full((rows, columns), index * 10, np.int16))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.3.4", "0020|000e": "1.2.3.4.5", "0020|0013": str(index + 1),
                "0020|0032": f"0\\0\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.8\\0.8",
                "0008|0018": f"1.2.3.4.5.{index + 1}", "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"s{len(positions) - index:03d}.dcm"))
        writer.Execute(image)
    return folder


def test_an_evenly_spaced_series_is_read_in_position_order(tmp_path):
    image = read_volume(_write_series(tmp_path / "ct", [0.0, 2.504, 4.998, 7.5]))  # positions rounded in the files
    assert image.GetSize() == (16, 16, 4) and image.GetSpacing()[2] == pytest.approx(2.5, abs=0.01)
    assert list(sitk.GetArrayFromImage(image)[:, 0, 0]) == [0, 10, 20, 30]


def test_a_series_with_a_missing_slice_names_the_gap(tmp_path, capfd):
    folder = _write_series(tmp_path / "ct", [0.0, 2.0, 10.0, 12.0])
    message = _refusal(folder)
    assert "not evenly spaced: 2 mm apart but 8 mm between s003.dcm (2 mm) and s002.dcm (10 mm)" in message
    assert "(a missing slice?)" in message
    assert "WARNING" not in capfd.readouterr().err  # ITK's own "Non uniform sampling" line is not shown


def test_a_series_with_a_damaged_file_names_it_instead_of_dropping_the_slice(tmp_path):
    folder = _write_series(tmp_path / "ct", [0.0, 2.0, 4.0])
    _cut(folder / "s002.dcm", keep=0.8)
    message = _refusal(folder)
    assert message.startswith(f"{folder / 's002.dcm'} is a DICOM file that cannot be read")
    assert "would be read without that slice" in message


def test_slices_all_at_one_position_are_not_a_volume(tmp_path):
    assert "the 4 slices of the series in" in _refusal(_write_series(tmp_path / "ct", [5.0] * 4))
    assert "share one position (5 mm): they are not a volume" in _refusal(tmp_path / "ct")


def test_a_repeated_slice_position_is_named(tmp_path):
    message = _refusal(_write_series(tmp_path / "ct", [0.0, 2.0, 2.0, 4.0]))
    assert "s003.dcm and s002.dcm" in message and "are at the same position (2 mm)" in message


def test_slices_of_two_sizes_are_named_with_both_sizes(tmp_path):
    message = _refusal(_write_series(tmp_path / "ct", [0.0, 2.0, 4.0], sizes={2: (12, 10)}))
    assert "differ in size: s003.dcm is 16 x 16 pixels, s001.dcm 10 x 12 pixels" in message


def test_a_folder_of_junk_says_so_without_itk_warnings(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert "holds no DICOM series" in _refusal(tmp_path)
    assert "WARNING" not in capfd.readouterr().err


# --- geometry and values -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [(1e-30,) * 3, (1e30,) * 3, (0.0008, 0.0008, 0.0025), (0.8, 0.8, 250.0)])
def test_a_spacing_no_ct_scan_has_is_refused(tmp_path, spacing):
    message = _refusal(_write(tmp_path / "ct.nii.gz", _image(spacing=spacing)))
    assert "outside the 0.01-100 mm a CT scan can have" in message


def test_a_line_of_voxels_is_not_a_ct_slice(tmp_path):
    message = _refusal(_write(tmp_path / "ct.nii.gz", _image(VOXELS[:, :1, :1].copy())))
    assert "axial slices" in message and "are 1 x 1 pixels" in message


def test_nan_voxels_are_refused_naming_the_model_view_slices(tmp_path):
    array = VOXELS.astype(np.float32)
    array[0, 3, 3], array[0, 4, 4], array[1, 5, 5] = np.nan, np.inf, -np.inf
    image = _image(array)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # stored superior first: stored k=0 is model-view slice 5
    message = _refusal(_write(tmp_path / "ct.mha", image))
    assert "has 3 NaN or infinite voxels, on model-view slice(s) 4, 5 (0 = most inferior" in message


# --- the command line --------------------------------------------------------------------------------------------

def _nan_volume(path):
    array = VOXELS.astype(np.float32)
    array[2, 0, 0] = np.nan
    return _write(path, _image(array))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: _cut(_write(tmp / "ct.nii.gz")) or tmp / "ct.nii.gz", "is truncated"),
    (lambda tmp: _write_series(tmp / "ct", [0.0, 2.0, 10.0, 12.0]), "not evenly spaced"),
    (lambda tmp: _write(tmp / "ct.nii.gz", _image(spacing=(1e-30,) * 3)), "a CT scan can have"),
    (lambda tmp: _nan_volume(tmp / "ct.mha"), "1 NaN or infinite voxels, on model-view slice(s) 2"),
])
def test_predict_refuses_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capfd, make, message):
    def load_model(args):
        raise AssertionError("the model was loaded for a volume that cannot be used")

    monkeypatch.setattr(predict, "resolve_model_source", lambda args: None)
    monkeypatch.setattr(predict, "engine_from_args", load_model)
    volume, out = make(tmp_path), tmp_path / "out"
    assert cli.main(["predict", str(volume), "--slices", "1:3", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err and "WARNING" not in err
    assert not out.exists()
