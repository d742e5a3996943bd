"""Read one DICOM series from a folder as a 3D SimpleITK image, refusing series whose geometry ITK would get wrong.

ITK's series reader assumes a complete, evenly spaced stack of same-size slices. Given anything else it carries on:
it skips a file it cannot parse (the other slices close up), spaces slices with gaps as if they were even, gives a
stack of slices at one position a made-up 1 mm spacing, and prints at most a WARNING line. Boxes on such a volume
would land millimetres away from the anatomy they mark, so `read_dicom_series` checks every slice's header first
and says which file or gap is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from SlicerMiniGPTPancreas.errors import UserError

# Slice spacing tolerance: 3D Slicer's DICOM reader warns when spacings differ by over 0.01 mm; 1 % of the spacing
# is allowed as well, so positions written rounded to 0.01 mm never trip it. A missing slice is 100 % off.
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.01
_REGULARIZE = ("3D Slicer's DICOM module can load such a series (Edit > Application Settings > DICOM > acquisition "
               "geometry regularization) and save it as NRRD for predict")


class DicomSeriesError(UserError, ValueError):
    """The DICOM folder holds no usable series, or a series that is not one evenly spaced stack of slices."""


class SliceHeader(NamedTuple):
    file: Path
    size: tuple[int, int]  # columns, rows
    position: float  # mm along the slice normal


def read_dicom_series(folder: Path, series: str | None = None):
    """The series `series` (a SeriesInstanceUID; None: the folder's only series) in `folder` as a SimpleITK image."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    found = reader.GetGDCMSeriesIDs(str(folder))
    if not found:
        raise DicomSeriesError(f"{folder} holds no DICOM series (sub-folders are not searched); give the folder that "
                               "holds the .dcm files of one CT series.")
    if series is None and len(found) > 1:
        raise DicomSeriesError(f"{folder} holds {len(found)} DICOM series; choose one with --series UID "
                               f"({', '.join(found)}).")
    if series is not None and series not in found:
        raise DicomSeriesError(f"series {series} is not in {folder}; it holds {', '.join(found)}.")
    files = [Path(name) for name in reader.GetGDCMSeriesFileNames(str(folder), series or found[0])]
    _check_no_damaged_files(folder, files, found)
    headers = [_slice_header(file) for file in files]
    _check_one_size(folder, headers)
    _check_even_spacing(folder, headers)
    reader.SetFileNames([str(file) for file in files])
    return reader.Execute()


def _check_no_damaged_files(folder: Path, files: list[Path], found: tuple) -> None:
    """GDCM leaves out of every series a DICOM file it cannot parse (a truncated copy, say), so the series would
    silently lose that slice: refuse any DICOM-looking file that no series lists."""
    listed = {file.name for file in files}
    suspects = [path for path in sorted(folder.iterdir()) if path.name not in listed and _looks_like_dicom(path)]
    if suspects and len(found) > 1:
        import SimpleITK as sitk

        for uid in found:
            listed.update(Path(name).name for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        suspects = [path for path in suspects if path.name not in listed]
    if suspects:
        others = f" (and {len(suspects) - 1} more)" if len(suspects) > 1 else ""
        raise DicomSeriesError(f"{suspects[0]}{others} is a DICOM file that cannot be read: it is damaged or was not "
                               "fully copied, and the series would be read without that slice. Copy the series "
                               "again, or move the file out of the folder if it does not belong to the series.")


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM Part 10 file (the "DICM" mark after the 128-byte preamble), except the DICOMDIR index."""
    if path.name.upper() == "DICOMDIR" or path.name.startswith(".") or not path.is_file():
        return False
    with path.open("rb") as file:
        return file.read(132)[128:] == b"DICM"


def _slice_header(file: Path) -> SliceHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DicomSeriesError(f"{file} cannot be read as a DICOM slice; it is damaged or was not fully copied. "
                               "Copy the series again.") from error
    normal = np.reshape(reader.GetDirection(), (3, 3))[:, 2]
    return SliceHeader(file, tuple(reader.GetSize()[:2]), float(np.dot(reader.GetOrigin(), normal)))


def _check_one_size(folder: Path, headers: list[SliceHeader]) -> None:
    first = headers[0]
    odd = next((header for header in headers if header.size != first.size), None)
    if odd is not None:
        raise DicomSeriesError(
            f"the slices of the series in {folder} differ in size: {first.file.name} is {_pixels(first)}, "
            f"{odd.file.name} {_pixels(odd)}. A volume needs slices of one size; move the odd ones (a localizer "
            "image?) out of the folder.")


def _pixels(header: SliceHeader) -> str:
    return f"{header.size[0]} x {header.size[1]} pixels"


def _check_even_spacing(folder: Path, headers: list[SliceHeader]) -> None:
    if len(headers) < 2:
        return
    ordered = sorted(headers, key=lambda header: header.position)
    gaps = np.diff([header.position for header in ordered])
    shared = np.flatnonzero(gaps <= SPACING_TOLERANCE_MM)
    if shared.size == gaps.size:
        raise DicomSeriesError(f"the {len(headers)} slices of the series in {folder} share one position "
                               f"({ordered[0].position:g} mm): they are not a volume.")
    if shared.size:
        first, second = ordered[shared[0]], ordered[shared[0] + 1]
        raise DicomSeriesError(f"{first.file.name} and {second.file.name} in {folder} are at the same position "
                               f"({first.position:g} mm): the series holds repeated slices (two acquisitions in one "
                               "series?). Keep one slice per position.")
    spacing = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * spacing)
    uneven = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
    if uneven.size:
        first, second = ordered[uneven[0]], ordered[uneven[0] + 1]
        gap = float(gaps[uneven[0]])
        hint = " (a missing slice?)" if gap > spacing else ""
        raise DicomSeriesError(
            f"the slices of the series in {folder} are not evenly spaced: {spacing:g} mm apart but {gap:g} mm between "
            f"{first.file.name} ({first.position:g} mm) and {second.file.name} ({second.position:g} mm){hint}. Copy "
            f"the complete series again; if it was acquired so, {_REGULARIZE}.")
