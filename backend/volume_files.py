"""Read the CT volume that `predict` (and `demo`) answer about, refusing files whose answers would be silently wrong.

Before anything else reads it, the file must hold every byte its header announces (`truncation`) and a DICOM
folder must hold one complete, evenly spaced series (`dicom_series`). After reading, the volume must be 3D, with a
voxel spacing a CT scan can have, axial slices of at least MIN_SLICE_PIXELS a side, and finite values. ITK's own
warnings are silenced while reading: what they warn about is checked and said here, in one line.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from backend.dicom_series import read_dicom_series
from backend.truncation import check_complete
from SlicerMiniGPTPancreas.errors import UserError

# Voxel spacing a CT volume can have, in mm. Clinical CT is 0.2-10 mm and micro-CT reaches 0.01 mm; nothing is
# scanned in voxels over 100 mm. Spacings outside come from a broken header or the wrong unit (metres, microns),
# and would put every box's position and size in the outputs off by as much.
SPACING_RANGE_MM = (0.01, 100.0)
# Fewer pixels than this along a side is not a CT slice (a line or a single voxel), whatever the file says.
MIN_SLICE_PIXELS = 8
_LISTED_SLICES = 5  # model-view slices named in the message about NaN voxels; the rest are counted


class VolumeFileError(UserError, ValueError):
    """The volume file or folder is missing, unreadable, or not a usable 3D CT volume."""


def read_volume(path: Path, series: str | None = None):
    """The 3D SimpleITK image at `path`: an image file, or a folder holding a DICOM series (HU rescale applied)."""
    if not path.exists():
        raise VolumeFileError(f"volume not found: {path}. Give a NIfTI, NRRD or MetaImage file or a DICOM folder.")
    if series is not None and not path.is_dir():
        raise VolumeFileError("--series applies to DICOM folders only; leave it out for a single file.")
    image = _read(path, series)
    dimension = image.GetDimension()
    if dimension == 2:
        raise VolumeFileError(f"{path} is a 2D image (a single slice); predict needs a 3D CT volume.")
    if dimension != 3:
        raise VolumeFileError(f"{path} is a {dimension}D image (e.g. a time series); predict needs one 3D CT "
                              "volume. Extract the volume you want first (in 3D Slicer: Sequences module).")
    _check_spacing(path, image)
    if image.GetNumberOfComponentsPerPixel() == 1:  # a colour image is refused, and said so, by the model view
        _check_slice_size(path, image)
        _check_finite(path, image)
    return image


def _read(path: Path, series: str | None):
    import SimpleITK as sitk

    if not path.is_dir():
        check_complete(path)
    try:
        with _itk_warnings_off():
            return read_dicom_series(path, series) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeFileError(f"cannot read {path} as an image volume ({_itk_reason(error)}). Give a NIfTI, NRRD or "
                              "MetaImage file, or a folder of DICOM files.") from error


@contextmanager
def _itk_warnings_off():
    """ITK prints its warnings ("Non uniform sampling or missing slices", "No Series were found") to stderr by
    itself; what they are about is checked and reported in this module's messages instead."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _check_spacing(path: Path, image) -> None:
    spacing = image.GetSpacing()
    low, high = SPACING_RANGE_MM
    if not all(low <= value <= high for value in spacing):
        shown = " x ".join(f"{value:g}" for value in spacing)
        raise VolumeFileError(
            f"{path} has a voxel spacing of {shown} mm, outside the {low:g}-{high:g} mm a CT scan can have: its "
            "header is wrong (the spacing in metres or microns?). Set the right spacing (3D Slicer: Volumes module, "
            "Volume Information) and save the volume again.")


def _axial_axis(image) -> int:
    """The voxel axis (0 = i, 1 = j, 2 = k) that runs nearest to inferior-superior: it numbers the axial slices."""
    direction = np.reshape(image.GetDirection(), (3, 3))  # columns: the i, j, k axes in LPS
    return int(np.argmax(np.abs(direction[2])))


def _check_slice_size(path: Path, image) -> None:
    axial = _axial_axis(image)
    columns, rows = (size for axis, size in enumerate(image.GetSize()) if axis != axial)
    if min(columns, rows) < MIN_SLICE_PIXELS:
        raise VolumeFileError(f"the axial slices of {path} are {columns} x {rows} pixels; a CT slice has at least "
                              f"{MIN_SLICE_PIXELS} x {MIN_SLICE_PIXELS}. Give the whole CT volume.")


def _check_finite(path: Path, image) -> None:
    """Refuse NaN or infinite voxels now, naming the slices as --slices numbers them, not after the model loaded."""
    import SimpleITK as sitk

    voxels = sitk.GetArrayViewFromImage(image)  # [k, j, i], no copy
    if not np.issubdtype(voxels.dtype, np.floating):
        return
    bad = ~np.isfinite(voxels)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return
    slices = _model_slices_holding(bad, image)
    named = ", ".join(str(s) for s in slices[:_LISTED_SLICES])
    more = f" and {len(slices) - _LISTED_SLICES} more" if len(slices) > _LISTED_SLICES else ""
    raise VolumeFileError(
        f"{path} has {count} NaN or infinite voxels, on model-view slice(s) {named}{more} (0 = most inferior, as "
        "--slices counts); the model needs finite HU values. Fill them (e.g. with -1024 HU, air) and save the volume "
        "again.")


def _model_slices_holding(mask: np.ndarray, image) -> list[int]:
    """The model-view slice numbers (0 = most inferior) of the axial slices where the [k, j, i] `mask` is set."""
    axial = _axial_axis(image)
    array_axis = 2 - axial
    stored = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != array_axis)))
    points_inferior = np.reshape(image.GetDirection(), (3, 3))[2, axial] < 0
    count = mask.shape[array_axis]
    return sorted(int(count - 1 - k) if points_inferior else int(k) for k in stored)


def _itk_reason(error: RuntimeError) -> str:
    """The one informative line of a SimpleITK/ITK exception text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    flagged = [line for line in lines if "ERROR" in line]
    reason = (flagged or lines or ["unknown error"])[-1]
    reason = re.sub(r"^(sitk::|ITK )?ERROR:\s*", "", reason)
    return reason if len(reason) <= 200 else reason[:197] + "..."
