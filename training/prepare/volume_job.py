"""Prepare one volume: read it, write its model-view slice PNGs, then its metadata and records.

Output for volume V of dataset D, under the output folder OUT:
- `OUT/D/slices/V_slice_{s}.png`: model-view slice s (s = inferior -> superior; image up = anterior, image
  left = patient right), 8-bit RGB through `preprocess.hu_slice_to_rgb` (upstream wrote RGBA PNGs that its
  loader converted to RGB; the pixels the model sees are the same);
- `OUT/D/volumes/V.json`: volume metadata (source files, geometry, settings, fingerprints);
- `OUT/D/records/V.json`: the list of per-slice records (`records.py`), written LAST. Its presence with
  matching settings in the metadata marks the volume finished, so a resumed run skips it.
This module runs in worker processes; it returns an outcome and never raises for a bad volume.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.geometry import GeometryError, ModelView
from SlicerMiniGPTPancreas.preprocess import hu_slice_to_rgb
from training.prepare.discovery import VolumeSource
from training.prepare.files import (OutputError, Problem, VolumeError, atomic_save_png, atomic_write_json,
                                   read_json)
from training.prepare.fingerprint import Fingerprint, fingerprint
from training.prepare.readers import Volume, read_image, read_label
from training.prepare.records import label_ids, structure_stats, volume_records

FORMAT_VERSION = 2  # 2: metadata holds slice_signatures (shared-slice duplicate groups)
INTENSITIES = ("window", "paper")
LABEL_GEOMETRIES = ("check", "image")
_LABEL_GRID_TOLERANCE_VOXELS = 0.25  # how far a label voxel centre may sit from the CT's, in voxels


@dataclass(frozen=True)
class VolumeSettings:
    """Options that change what is written for a volume; a change makes a resumed run redo the volume."""

    intensity: str = "window"  # "window" (upstream HEAD) or "paper" (2-98 % crop + equalisation)
    label_geometry: str = "check"  # "check": labels must share the CT's grid; "image": pair voxels by index


@dataclass(frozen=True)
class VolumeOutcome:
    dataset: str
    volume: str
    status: str  # "prepared" | "resumed" (finished earlier, skipped) | "failed"
    problem: Problem | None = None


def records_path(out: Path, dataset: str, volume: str) -> Path:
    return out / dataset / "records" / f"{volume}.json"


def meta_path(out: Path, dataset: str, volume: str) -> Path:
    return out / dataset / "volumes" / f"{volume}.json"


def is_finished(out: Path, source: VolumeSource, settings: VolumeSettings) -> bool:
    """True when the volume's records exist and were written with these settings."""
    records, meta = records_path(out, source.dataset, source.volume), meta_path(out, source.dataset, source.volume)
    if not (records.is_file() and meta.is_file()):
        return False
    try:
        written = read_json(meta)
    except (OSError, ValueError):
        return False
    return written.get("format") == FORMAT_VERSION and written.get("settings") == asdict(settings)


def prepare_volume(source: VolumeSource, out: str, settings: VolumeSettings) -> VolumeOutcome:
    """Prepare one volume (again, if it was); failures come back as an outcome with a `Problem`."""
    try:
        _prepare(source, Path(out), settings)
    except (VolumeError, OutputError) as error:  # its message says what is wrong and what to do
        return _failed(source, str(error))
    except Exception as error:  # a bug or an unforeseen file problem must not stop the other volumes
        where = traceback.extract_tb(error.__traceback__)[-1]
        return _failed(source, f"unexpected {type(error).__name__}: {error} (at {Path(where.filename).name}:"
                               f"{where.lineno}); please report it with this message.")
    return VolumeOutcome(source.dataset, source.volume, "prepared")


def _failed(source: VolumeSource, message: str) -> VolumeOutcome:
    problem = Problem(source.dataset, source.volume, source.image, message)
    return VolumeOutcome(source.dataset, source.volume, "failed", problem)


def _prepare(source: VolumeSource, out: Path, settings: VolumeSettings) -> None:
    image = read_image(source)
    labels = read_label(source.label, label_ids(source.dataset))
    image_view = _model_view(image.array, image.ijk_to_ras, image.path)
    label_view = _label_view(image, image_view, labels, settings.label_geometry)
    spacing = tuple(round(v, 6) for v in image_view.spacing)
    prints = fingerprint(image_view.array, spacing)
    for s in range(image_view.shape[0]):
        atomic_save_png(out / _png_path(source, s), hu_slice_to_rgb(image_view.slice(s), settings.intensity))
    stats = structure_stats(source.dataset, label_view.array, image_view.array)
    extra = _slice_extras(source, image, image_view, spacing, prints)
    records = volume_records(source.dataset, source.volume_name, image_view.shape, stats, extra)
    atomic_write_json(meta_path(out, source.dataset, source.volume), _meta(source, settings, image_view, spacing,
                                                                           prints))
    atomic_write_json(records_path(out, source.dataset, source.volume), records)  # last: the resume marker


def _png_path(source: VolumeSource, s: int) -> str:
    """The PNG of model-view slice s, relative to OUT."""
    return f"{source.dataset}/slices/{source.volume}_slice_{s}.png"


def _slice_extras(source: VolumeSource, image: Volume, view: ModelView, spacing: tuple[float, ...],
                  prints: Fingerprint) -> list[dict[str, Any]]:
    """Our keys after upstream's: where each slice came from, its geometry and its content hashes."""
    source_axis = int(np.flatnonzero(view.model_to_ijk_matrix[:3, 2])[0])  # the file axis along model s
    model_to_ijk = view.model_to_ijk_matrix.tolist()
    extras = []
    for s in range(view.shape[0]):
        index = int(view.model_to_ijk(0, 0, s)[source_axis])
        extras.append({
            "volume": source.volume,
            "image": _png_path(source, s),
            "source_file": source.image,
            "source_label_file": source.label,
            "source_slice_file": image.slice_files[index] if image.slice_files and source_axis == 2 else None,
            "source_voxel_index": {"axis": "ijk"[source_axis], "index": index},
            "model_to_ijk": model_to_ijk,
            "spacing": list(spacing),
            "content_hash": prints.slice_hashes[s],
            "volume_hash": prints.volume_hash,
        })
    return extras


def _meta(source: VolumeSource, settings: VolumeSettings, view: ModelView, spacing: tuple[float, ...],
          prints: Fingerprint) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION, "settings": asdict(settings), "dataset": source.dataset,
        "volume": source.volume, "volume_name": source.volume_name, "source_file": source.image,
        "source_label_file": source.label, "shape": list(view.shape), "spacing": list(spacing),
        "model_to_ijk": view.model_to_ijk_matrix.tolist(), "ijk_to_ras": view.ijk_to_ras.tolist(),
        "volume_hash": prints.volume_hash, "signature": prints.signature,
        "slice_signatures": prints.slice_signatures,
    }


def _model_view(array: np.ndarray, ijk_to_ras: np.ndarray, path: str) -> ModelView:
    try:
        return ModelView.from_volume(array, ijk_to_ras)
    except GeometryError as error:
        raise VolumeError(f"{path}: {error}") from None


def _label_view(image: Volume, image_view: ModelView, labels: Volume, mode: str) -> ModelView:
    """The label's model view, refused unless it lies on the CT's voxel grid (any storage order)."""
    if mode == "image":  # upstream's pairing: label voxel [k, j, i] is CT voxel [k, j, i]
        if labels.array.shape != image.array.shape:
            raise VolumeError(f"{labels.path} has {_dims(labels.array.shape)} voxels but the CT {image.path} has "
                              f"{_dims(image.array.shape)}; they cannot be paired voxel by voxel.")
        return _model_view(labels.array, image.ijk_to_ras, labels.path)
    label_view = _model_view(labels.array, labels.ijk_to_ras, labels.path)
    if label_view.shape != image_view.shape:
        raise VolumeError(f"{labels.path} covers {_dims(label_view.shape)} voxels (slices x rows x columns) but "
                          f"the CT {image.path} covers {_dims(image_view.shape)}; this label belongs to another scan.")
    corners = np.array([[c, r, s, 1.0] for c in (0, image_view.shape[2] - 1) for r in (0, image_view.shape[1] - 1)
                        for s in (0, image_view.shape[0] - 1)])  # [8, 4] model coordinates
    offsets_mm = np.abs(corners @ (label_view.model_to_ras_matrix - image_view.model_to_ras_matrix).T)[:, :3]
    offset_voxels = float(offsets_mm.max() / min(image_view.spacing))
    if offset_voxels > _LABEL_GRID_TOLERANCE_VOXELS:
        raise VolumeError(
            f"{labels.path} does not lie on the CT's voxel grid ({image.path}): its voxels are up to "
            f"{offsets_mm.max():.2f} mm ({offset_voxels:.1f} voxels) away from the CT's. If you know the label "
            "was drawn on this CT voxel by voxel, rerun with --label-geometry image.")
    return label_view


def _dims(shape) -> str:
    return "x".join(str(n) for n in shape)
