"""Write phantoms as real files in the layouts the public datasets ship in (docs/datasets.md).

- `write_msd`: MSD Task07_Pancreas (NIfTI images and labels, dataset.json).
- `write_abdomenct1k`: AbdomenCT-1K (image parts by case number, a mask folder of organ labels).
- `write_nih`: NIH Pancreas-CT (one axial DICOM series per case, labels as NIfTI in another orientation).

SimpleITK is imported inside the functions, so `SlicerMiniGPTPancreas` imports without it; a missing SimpleITK
raises `SimpleITKMissingError` with the install command. Files are written to a temporary name in the same
folder and then renamed (a DICOM series: its whole case folder), so an interrupted run leaves no half file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from SlicerMiniGPTPancreas.atomic import atomic_write, atomic_write_bytes, staged_folder
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import LPS_TO_RAS
from SlicerMiniGPTPancreas.phantom import Phantom, direction_lps, reorient

__all__ = [
    "SimpleITKMissingError", "PhantomWriteError", "to_sitk_image", "to_sitk_labels", "write_msd",
    "write_abdomenct1k", "abdomenct1k_image_part", "write_nih", "NIH_LABELS_FOLDER",
]

NIH_LABELS_FOLDER = "TCIA_pancreas_labels-02-05-2017"
_UID_ROOT = "1.2.826.0.1.3680043.2.1125.1."  # GDCM's root, as in the NIH series' UIDs
_STORED_RANGE = {"int16": (-32768, 32767, "1"), "uint16": (0, 65535, "0")}  # min, max, PixelRepresentation


class SimpleITKMissingError(UserError, ImportError):
    """SimpleITK is not installed; the phantom writers need it."""


class PhantomWriteError(UserError, ValueError):
    """The phantoms cannot be written as asked (the message says what to change)."""


def _sitk():
    try:
        import SimpleITK
    except ImportError as error:
        raise SimpleITKMissingError(
            "SimpleITK is needed to write phantom files; install it with "
            "`pip install 'minigpt-pancreas[training]'` (or `pip install SimpleITK`)") from error
    return SimpleITK


def to_sitk_image(phantom: Phantom, array: np.ndarray | None = None):
    """A SimpleITK image of `array` [k, j, i] (default: the HU) with the phantom's geometry (LPS)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(phantom.hu if array is None else array)
    image.SetSpacing(phantom.spacing)
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ phantom.origin_ras))  # RAS -> LPS
    image.SetDirection(tuple(direction_lps(phantom.orientation).ravel()))
    return image


def to_sitk_labels(phantom: Phantom, kind: str = "msd"):
    """Label image: "msd" (1 pancreas, 2 tumour), "organs" (AbdomenCT-1K ids) or "pancreas" (0/1, tumour incl.)."""
    arrays = {"msd": lambda: phantom.labels, "organs": lambda: phantom.organs,
              "pancreas": lambda: (phantom.labels > 0).astype(np.uint8)}
    if kind not in arrays:
        raise PhantomWriteError(f"label kind {kind!r} is unknown; use one of {sorted(arrays)}")
    return to_sitk_image(phantom, arrays[kind]())


def _write_nifti(image, path: Path) -> None:
    sitk = _sitk()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: sitk.WriteImage(image, str(temporary), True))  # True: compress


def _case_ids(phantoms: Sequence[Phantom], start_index: int, case_ids: Sequence[int] | None,
              largest: int) -> list[int]:
    ids = list(range(start_index, start_index + len(phantoms))) if case_ids is None else [int(i) for i in case_ids]
    if len(ids) != len(phantoms):
        raise PhantomWriteError(f"{len(ids)} case ids for {len(phantoms)} phantoms; give one id per phantom")
    if len(set(ids)) != len(ids) or any(not 1 <= i <= largest for i in ids):
        raise PhantomWriteError(f"case ids must be distinct integers in 1..{largest}, got {ids}")
    return ids


def write_msd(root, phantoms: Sequence[Phantom], start_index: int = 1, *,
              case_ids: Sequence[int] | None = None) -> Path:
    """Write `root/Task07_Pancreas/{imagesTr,labelsTr}/pancreas_XXX.nii.gz` and `dataset.json`; return the task dir.

    case_ids: explicit (possibly non-contiguous) case numbers instead of start_index, start_index+1, ...
    dataset.json lists the cases written by this call.
    """
    task = Path(root) / "Task07_Pancreas"
    ids = _case_ids(phantoms, start_index, case_ids, 999)
    training = []
    for case_id, phantom in zip(ids, phantoms):
        name = f"pancreas_{case_id:03d}.nii.gz"
        _write_nifti(to_sitk_image(phantom), task / "imagesTr" / name)
        _write_nifti(to_sitk_labels(phantom, "msd"), task / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "Pancreas", "description": "Pancreas and cancer segmentation (synthetic phantom)",
        "reference": "Memorial Sloan Kettering Cancer Center", "licence": "CC-BY-SA 4.0",
        "release": "1.0 04/05/2018", "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": len(training), "numTest": 0, "training": training, "test": [],
    }
    atomic_write_bytes(task / "dataset.json", json.dumps(dataset, indent=4).encode("utf-8"))
    return task


def abdomenct1k_image_part(case_id: int) -> int:
    """The ImagePart (1, 2 or 3) that holds a case: 1-400, 401-800, 801+."""
    return 1 if case_id <= 400 else 2 if case_id <= 800 else 3


def write_abdomenct1k(root, phantoms: Sequence[Phantom], nested: bool = True, masks_folder: str = "Mask", *,
                      start_index: int = 1, case_ids: Sequence[int] | None = None) -> Path:
    """Write AbdomenCT-1K images and masks under `root`; return root.

    Images: `AbdomenCT-1K-ImagePartN[/ImagePartN]/Case_XXXXX_0000.nii.gz` (N by case number, see
    `abdomenct1k_image_part`); masks: `<masks_folder>/Case_XXXXX.nii.gz`.

    nested: images inside the inner `ImagePartN/` folder that the zips extract to. Masks hold the organ ids
    1 liver, 2 kidneys, 3 spleen, 4 pancreas (tumour included).
    """
    root = Path(root)
    if not masks_folder or Path(masks_folder).name != masks_folder or masks_folder in (".", ".."):
        raise PhantomWriteError(
            f"masks_folder must be a plain folder name like 'Mask' or 'Masks', got {masks_folder!r}")
    for case_id, phantom in zip(_case_ids(phantoms, start_index, case_ids, 99999), phantoms):
        part = abdomenct1k_image_part(case_id)
        images = root / f"AbdomenCT-1K-ImagePart{part}"
        images = images / f"ImagePart{part}" if nested else images
        _write_nifti(to_sitk_image(phantom), images / f"Case_{case_id:05d}_0000.nii.gz")
        _write_nifti(to_sitk_labels(phantom, "organs"), root / masks_folder / f"Case_{case_id:05d}.nii.gz")
    return root


def write_nih(root, phantoms: Sequence[Phantom], shuffle_names: bool = True, slope: float = 1.0,
              intercept: float = -1024.0, depth: str = "date", *, pixel_type: str = "int16",
              label_orientation: str = "RAS", start_index: int = 1,
              case_ids: Sequence[int] | None = None) -> Path:
    """Write NIH Pancreas-CT under `root`; return root.

    Images: `PANCREAS_XXXX/<study>/<series>/1-NNN.dcm`; labels: `TCIA_pancreas_labels-02-05-2017/labelXXXX.nii.gz`.

    The DICOM series are axial: each phantom is re-stored as "LPS" (rows posterior, columns toward the patient's
    left, slices inferior to superior; no interpolation) and written one slice per file with
    stored = round((HU - intercept) / slope) as `pixel_type` ("int16" or "uint16"); InstanceNumber follows the
    slice position. shuffle_names: the NNN of the file names is a seeded permutation, so name order is not
    position order (readers must sort by ImagePositionPatient). depth: "date" names the folders
    `MM-DD-YYYY-PANCREASXXXX-Pancreas-NNNNN/Pancreas-NNNNN`, "uid" names them by study and series UID.
    Labels are 0/1 (pancreas including tumour) stored in `label_orientation` (a phantom orientation code):
    the same physical space as the DICOM but, by default, another voxel order, so readers must match them by
    geometry. ("LPS" gives the DICOM's own voxel order, which upstream's index-based pairing assumes.)
    """
    sitk = _sitk()
    if depth not in ("date", "uid"):
        raise PhantomWriteError(f"depth must be 'date' or 'uid', got {depth!r}")
    if pixel_type not in _STORED_RANGE:
        raise PhantomWriteError(f"pixel_type must be one of {sorted(_STORED_RANGE)}, got {pixel_type!r}")
    if not (np.isfinite(slope) and slope > 0 and np.isfinite(intercept)):
        raise PhantomWriteError(f"slope must be finite and > 0 and intercept finite, got {slope!r}, {intercept!r}")
    direction_lps(label_orientation)  # refuses a bad code before anything is written
    root = Path(root)
    for case_id, phantom in zip(_case_ids(phantoms, start_index, case_ids, 9999), phantoms):
        axial = reorient(phantom, "LPS")
        _check_stored_range(axial, slope, intercept, pixel_type)
        _write_dicom_case(sitk, axial, case_id, root, shuffle_names, slope, intercept, depth, pixel_type)
        labelled = reorient(phantom, label_orientation)
        _write_nifti(to_sitk_labels(labelled, "pancreas"), root / NIH_LABELS_FOLDER / f"label{case_id:04d}.nii.gz")
    return root


def _check_stored_range(phantom: Phantom, slope: float, intercept: float, pixel_type: str) -> None:
    lowest, highest, _ = _STORED_RANGE[pixel_type]
    stored = (np.array([phantom.hu.min(), phantom.hu.max()], float) - intercept) / slope
    if np.rint(stored[0]) < lowest or np.rint(stored[1]) > highest:
        raise PhantomWriteError(
            f"HU {phantom.hu.min()}..{phantom.hu.max()} with slope {slope} and intercept {intercept} give stored "
            f"values {stored[0]:.0f}..{stored[1]:.0f}, outside {pixel_type}; change intercept, slope or pixel_type")


def _uid(rng: np.random.Generator) -> str:
    digits = "".join(str(d) for d in rng.integers(0, 10, 28))  # 58 characters: room for ".NNNN" within 64
    return _UID_ROOT + str(int(rng.integers(1, 10))) + digits  # no leading zero in a UID component


def _write_dicom_case(sitk, phantom: Phantom, case_id: int, root: Path, shuffle_names: bool, slope: float,
                      intercept: float, depth: str, pixel_type: str) -> None:
    """Write one axial (LPS-stored) phantom as a DICOM series; the case folder appears whole or not at all."""
    rng = np.random.default_rng((phantom.seed, case_id, 7))  # same phantom + id -> same UIDs and names
    study_uid, series_uid = _uid(rng), _uid(rng)
    number = int(rng.integers(10000, 100000))
    month, day, year = int(rng.integers(1, 13)), int(rng.integers(1, 29)), int(rng.integers(2008, 2016))
    if depth == "date":
        study_dir = f"{month:02d}-{day:02d}-{year}-PANCREAS{case_id:04d}-Pancreas-{number}"
        series_dir = f"Pancreas-{number}"
    else:
        study_dir, series_dir = study_uid, series_uid
    n_slices = phantom.shape[0]
    name_numbers = np.arange(1, n_slices + 1)
    while shuffle_names and n_slices > 1 and np.all(name_numbers == np.arange(1, n_slices + 1)):
        name_numbers = rng.permutation(n_slices) + 1
    spacing_k = phantom.spacing[2]
    representation = _STORED_RANGE[pixel_type][2]
    series_tags = {
        "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0020": f"{year}{month:02d}{day:02d}", "0008|103e": "Pancreas", "0010|0010": f"PANCREAS_{case_id:04d}",
        "0010|0020": f"PANCREAS_{case_id:04d}", "0020|000d": study_uid, "0020|000e": series_uid, "0020|0011": "1",
        "0020|0037": "1\\0\\0\\0\\1\\0",  # LPS storage: rows run toward +x (left), columns toward +y (posterior)
        "0018|0050": f"{spacing_k:.10g}",  # PixelSpacing (0028|0030) ITK writes from the slice image's spacing
        "0028|1052": f"{intercept:.10g}", "0028|1053": f"{slope:.10g}",
        # An explicit stored pixel format: with it, GDCM converts the float HU we hand it to
        # round((HU - intercept) / slope) itself (it refuses a non-integer slope without it).
        "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": representation,
    }
    image = to_sitk_image(phantom, phantom.hu.astype(np.float32))
    with staged_folder(root / f"PANCREAS_{case_id:04d}") as staging:
        series_path = staging / study_dir / series_dir
        series_path.mkdir(parents=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(n_slices):
            slice_image = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))  # LPS mm
            slice_tags = {"0020|0032": "\\".join(f"{v:.10g}" for v in position), "0020|0013": str(k + 1),
                          "0020|1041": f"{position[2]:.10g}", "0008|0018": f"{series_uid}.{k + 1}"}
            for tag, value in {**series_tags, **slice_tags}.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(series_path / f"1-{name_numbers[k]:03d}.dcm"))
            writer.Execute(slice_image)
