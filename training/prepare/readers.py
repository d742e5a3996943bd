"""Read one dataset volume (CT + label) into arrays [k, j, i] with their `ijk_to_ras` geometry.

- NIfTI files (MSD, AbdomenCT-1K, every label) are read with SimpleITK, which applies the NIfTI scaling.
- NIH DICOM series: every DICOM file below the case folder is found at any depth. The files are ordered by
  ImagePositionPatient along the slice normal, never by name or InstanceNumber, and the spacing between
  positions must be even (a gap means a missing file). SimpleITK reads the pixels in that order and applies
  each file's RescaleSlope/RescaleIntercept; this is checked against pydicom on one file and done here
  if the reader did not. The geometry comes from the DICOM headers.
Every failure raises `VolumeError` whose message names the file and says what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from SlicerMiniGPTPancreas.geometry import LPS_TO_RAS
from training.prepare.discovery import VolumeSource, walk_visible
from training.prepare.files import VolumeError

_GAP_TOLERANCE = 0.1  # fraction of the slice step a position may deviate by


@dataclass
class Volume:
    """Voxels [K, J, I] and their 4x4 ijk_to_ras; `slice_files[k]` is the DICOM file of slice k, if any."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    path: str
    slice_files: list[str] | None = None


def read_image(source: VolumeSource) -> Volume:
    """The CT of a source, in HU (int16 where the values allow, else float32)."""
    if source.dataset == "nih":
        return read_dicom_series(Path(source.image))
    volume = read_nifti(source.image)
    volume.array = compact_hu(volume.array)
    return volume


def read_label(path: str, allowed: tuple[int, ...]) -> Volume:
    """A label NIfTI as uint8 [K, J, I]; refuses non-integer values and ids outside `allowed`."""
    volume = read_nifti(path)
    values = volume.array
    if not np.issubdtype(values.dtype, np.integer):
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise VolumeError(f"{path} holds non-integer label values; a label file must hold class ids.")
        values = rounded
    present = np.unique(values)
    unexpected = sorted(set(present.tolist()) - set(allowed))
    if unexpected:
        raise VolumeError(f"{path} holds label ids {unexpected}, expected only {list(allowed)}; "
                          "is this the right label file for this dataset?")
    volume.array = values.astype(np.uint8)
    return volume


def read_nifti(path: str) -> Volume:
    """A 3D scalar NIfTI via SimpleITK, or `VolumeError` naming the file."""
    import SimpleITK as sitk

    from SlicerMiniGPTPancreas.geometry import volume_from_sitk

    if not os.path.isfile(path):
        raise VolumeError(f"{path} does not exist.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeError(f"cannot read {path}: {_sitk_reason(error, path)}. The file is probably truncated or "
                          "corrupt; download it again.") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path} is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} "
                          "values per voxel; expected a 3D scalar volume.")
    array, ijk_to_ras = volume_from_sitk(image)
    return Volume(array=array, ijk_to_ras=ijk_to_ras, path=str(path))


def compact_hu(array: np.ndarray) -> np.ndarray:
    """HU as int16 when every value is an integer in range (halves memory), else float32."""
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.int16 or (array.min() >= -32768 and array.max() <= 32767):
            return array.astype(np.int16, copy=False)
    elif np.all(np.isfinite(array)) and np.array_equal(np.rint(array), array) and np.abs(array).max() < 32768:
        return array.astype(np.int16)
    return array.astype(np.float32, copy=False)


def _sitk_reason(error: RuntimeError, path: str) -> str:
    """The useful last line of an ITK exception text, without its source prefixes and with `path` as "it"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    reason = re.sub(r"^(sitk::ERROR: |ITK ERROR: \w+\(0x[0-9a-fA-F]+\): )", "", reason)
    return reason.replace(f'"{path}"', "it").replace(str(path), "it").rstrip(".")


@dataclass(frozen=True)
class _DicomHeader:
    path: str
    series: str
    position: np.ndarray  # [3] LPS mm of the first pixel
    orientation: np.ndarray  # [6] row and column direction cosines (LPS)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slope: float
    intercept: float


def read_dicom_series(case_dir: Path) -> Volume:
    """The CT series below `case_dir`, sorted by position, in HU."""
    import SimpleITK as sitk

    headers = _series_headers(case_dir)
    normal = np.cross(headers[0].orientation[:3], headers[0].orientation[3:])
    headers.sort(key=lambda header: float(header.position @ normal))
    step = _checked_step(headers, normal)
    files = [header.path for header in headers]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(f"cannot read the DICOM series {case_dir}: {_unreadable_file(files)}") from error
    array = sitk.GetArrayFromImage(image)  # [K, J, I], K in position order
    array = _ensure_rescaled(array, headers)
    ijk_to_ras = np.eye(4)
    row_spacing, column_spacing = headers[0].pixel_spacing
    # +i runs along a row (the row cosine), +j down a column; +k from the first to the last position.
    ijk_to_ras[:3, 0] = LPS_TO_RAS @ headers[0].orientation[:3] * column_spacing
    ijk_to_ras[:3, 1] = LPS_TO_RAS @ headers[0].orientation[3:] * row_spacing
    ijk_to_ras[:3, 2] = LPS_TO_RAS @ step
    ijk_to_ras[:3, 3] = LPS_TO_RAS @ headers[0].position
    return Volume(array=compact_hu(array), ijk_to_ras=ijk_to_ras, path=str(case_dir), slice_files=files)


def _series_headers(case_dir: Path) -> list[_DicomHeader]:
    """Headers of the largest image series below `case_dir` (NIH cases hold one).

    A file without image geometry is ignored if it belongs to another series (a report, say); in the chosen
    series, or with no series at all, it is a file cut short and refused by name.
    """
    import pydicom

    by_series: dict[str, list[_DicomHeader]] = {}
    without_geometry: list[tuple[Path, str]] = []
    for folder, _, filenames in walk_visible(case_dir):
        for name in filenames:
            path = folder / name
            if not _looks_like_dicom(path):
                continue
            try:
                dataset = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as error:  # pydicom raises many types for damaged files
                raise VolumeError(f"{path} is not a readable DICOM file ({error}); download the case again.") from None
            if "ImagePositionPatient" not in dataset or "ImageOrientationPatient" not in dataset:
                without_geometry.append((path, str(dataset.get("SeriesInstanceUID", ""))))
                continue
            header = _header(path, dataset)
            by_series.setdefault(header.series, []).append(header)
    if not by_series:
        raise VolumeError(f"no DICOM image files found below {case_dir}.")
    headers = max(by_series.values(), key=len)
    for path, series in without_geometry:
        if series in ("", headers[0].series):
            raise VolumeError(f"{path} has no image position or orientation (it is probably truncated); "
                              "download the case again.")
    return headers


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _header(path: Path, dataset) -> _DicomHeader:
    try:
        return _DicomHeader(
            path=str(path),
            series=str(dataset.get("SeriesInstanceUID", "")),
            position=np.array([float(v) for v in dataset.ImagePositionPatient]),
            orientation=np.array([float(v) for v in dataset.ImageOrientationPatient]),
            pixel_spacing=tuple(float(v) for v in dataset.PixelSpacing),
            slope=float(dataset.get("RescaleSlope", 1.0)),
            intercept=float(dataset.get("RescaleIntercept", 0.0)),
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise VolumeError(f"{path} has a missing or malformed geometry tag ({error}).") from None


def _checked_step(headers: list[_DicomHeader], normal: np.ndarray) -> np.ndarray:
    """[3] LPS displacement between consecutive slices; refuses mixed orientations, duplicates and gaps."""
    for header in headers:
        if not np.allclose(header.orientation, headers[0].orientation, atol=1e-4):
            raise VolumeError(f"{header.path} is tilted differently from {headers[0].path}; "
                              "the series mixes orientations.")
    if len(headers) < 2:
        raise VolumeError(f"the series of {headers[0].path} has a single slice; a CT volume needs at least two.")
    distances = np.array([float(header.position @ normal) for header in headers])  # [K], sorted
    gaps = np.diff(distances)
    step = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if abs(gap - step) > _GAP_TOLERANCE * abs(step) or step == 0:
            raise VolumeError(
                f"{headers[k].path} and {headers[k + 1].path} are {gap:.3f} mm apart where the series steps "
                f"{step:.3f} mm: a slice is missing or duplicated; download the case again.")
    return (headers[-1].position - headers[0].position) / (len(headers) - 1)


def _unreadable_file(files: list[str]) -> str:
    """Find the file that breaks a series read, by reading them one at a time."""
    import SimpleITK as sitk

    for path in files:
        try:
            sitk.ReadImage(path)
        except RuntimeError as error:
            return f"{path} cannot be read ({_sitk_reason(error, path)}); download the case again"
    return "SimpleITK could not combine the files into one volume"


def _ensure_rescaled(array: np.ndarray, headers: list[_DicomHeader]) -> np.ndarray:
    """HU: check SimpleITK applied RescaleSlope/Intercept on one file, apply them per file if it did not."""
    import pydicom

    from SlicerMiniGPTPancreas.preprocess import apply_rescale

    k = next((k for k, h in enumerate(headers) if (h.slope, h.intercept) != (1.0, 0.0)), None)
    if k is None:
        return array
    try:
        stored = pydicom.dcmread(headers[k].path).pixel_array  # [J, I]
    except Exception:  # compressed pixel data pydicom cannot decode: SimpleITK/GDCM is trusted
        return array
    if np.allclose(array[k], apply_rescale(stored, headers[k].slope, headers[k].intercept), atol=0.5):
        return array
    if np.array_equal(array[k], stored):
        return np.stack([apply_rescale(array[i], h.slope, h.intercept) for i, h in enumerate(headers)])
    raise VolumeError(f"the pixel values SimpleITK read from {headers[k].path} match neither the stored values "
                      "nor the rescaled HU; the file may be damaged.")
