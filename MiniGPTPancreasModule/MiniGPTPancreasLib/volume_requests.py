"""A volume node read into self-contained requests: the main-thread step of every question.

A request copies the voxels a question needs (int16 HU) with the geometry its boxes are placed on, so that the network
step can run on any thread and the drawing step never reads the node again. A sweep of a volume tilted against the
patient axes (gantry tilt) has no axial slices as stored: it is refused, or, with `resample_tilted`, sent whole for the
server to resample onto the nearest axial grid, which is then the request's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.geometry import GeometryError, ModelView, ObliqueVolumeError, nearest_axial_grid
from SlicerMiniGPTPancreas.wire_arrays import check_volume_bytes

from .volume_geometry import model_view, model_view_geometry, to_int16_hu, volume_array_and_matrix, world_ijk_to_ras

RESAMPLE_CHECKBOX_TEXT = "Resample tilted volumes to axial"  # the panel's check box that sets resample_tilted


@dataclass(frozen=True, eq=False)
class SliceRequest:
    """One model-view slice read from a volume node, ready to send from any thread."""

    volume_name: str
    geometry: ModelView  # world geometry of the whole volume, without voxels
    slice_index: int
    slice_hu: np.ndarray  # [R, C] int16 copy
    pixel_spacing_mm: tuple[float, float]  # (col, row)


@dataclass(frozen=True, eq=False)
class SweepRequest:
    """Model-view slices first..last (inclusive) of a volume node, ready to upload from any thread."""

    volume_name: str
    geometry: ModelView
    first_slice: int
    last_slice: int
    volume_hu: np.ndarray  # [last - first + 1, R, C] int16 copy
    spacing_mm: tuple[float, float, float]  # (col, row, slice)
    upload_key: tuple  # identifies these voxels: the same key reuses the server's copy
    # A tilted volume with resample_tilted: volume_hu is then the whole volume as stored [K, J, I], uploaded with
    # this ijk_to_ras for the server to resample onto the nearest axial grid, which `geometry` describes.
    scan_ijk_to_ras: np.ndarray | None = None

    @property
    def resampled(self) -> bool:
        """The server resamples the volume: slices and boxes are on its nearest axial grid, not the stored one."""
        return self.scan_ijk_to_ras is not None

    @property
    def uploaded_first_slice(self) -> int:
        """The model-view slice that is slice 0 of the uploaded volume."""
        return 0 if self.resampled else self.first_slice


def slice_request(volume_node: Any, model_view_slice: int) -> SliceRequest:
    """Model-view slice `model_view_slice` of the volume as int16 HU."""
    view = model_view(volume_node)
    slice_hu = to_int16_hu(view.slice(model_view_slice))  # GeometryError for a slice outside the volume
    return SliceRequest(volume_node.GetName(), model_view_geometry(volume_node), int(model_view_slice), slice_hu,
                        view.spacing[:2])


def sweep_geometry(volume_node: Any, resample_tilted: bool) -> ModelView:
    """The model view a sweep of the node is on (no voxels): the node's own or, for a tilted volume with
    `resample_tilted`, the nearest axial grid the server resamples onto; else the refusal naming the option."""
    try:
        return model_view_geometry(volume_node)
    except ObliqueVolumeError as error:
        if not resample_tilted:
            raise ObliqueVolumeError(f"{error} Or let the server resample it: check '{RESAMPLE_CHECKBOX_TEXT}' "
                                     "(the logic's resample_tilted option).") from error
        shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))  # [K, J, I]
        grid = nearest_axial_grid(world_ijk_to_ras(volume_node), shape)
        return ModelView.from_volume(np.broadcast_to(np.zeros((), np.int16), shape), grid)


def sweep_request(volume_node: Any, slice_range: tuple[int, int] | None, resample_tilted: bool) -> SweepRequest:
    """Model-view slices first..last (inclusive; None = all) of sweep_geometry as int16 HU; a tilted volume whole,
    for the server to resample, with `resample_tilted`."""
    geometry = sweep_geometry(volume_node, resample_tilted)
    try:
        view = model_view(volume_node)
    except ObliqueVolumeError:  # sweep_geometry let it through: resample_tilted is on
        return _tilted_sweep_request(volume_node, geometry, slice_range)
    first, last = _checked_range(slice_range, view.shape[0])
    check_volume_bytes((last - first + 1,) + view.shape[1:], "the slice range")
    image = volume_node.GetImageData()
    key = (volume_node.GetID(), image.GetMTime(), view.ijk_to_ras.tobytes(), first, last)
    return SweepRequest(volume_node.GetName(), geometry, first, last, to_int16_hu(view.array[first:last + 1]),
                        view.spacing, key)


def _tilted_sweep_request(volume_node: Any, geometry: ModelView,
                          slice_range: tuple[int, int] | None) -> SweepRequest:
    array_kji, matrix = volume_array_and_matrix(volume_node)
    check_volume_bytes(array_kji.shape, "the volume")
    first, last = _checked_range(slice_range, geometry.shape[0])
    key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), matrix.tobytes(), "resampled")
    return SweepRequest(volume_node.GetName(), geometry, first, last, to_int16_hu(array_kji), geometry.spacing,
                        key, scan_ijk_to_ras=matrix)


def _checked_range(slice_range: tuple[int, int] | None, slices: int) -> tuple[int, int]:
    """(first, last) model-view slices of `slice_range` (None: all), inside a volume of `slices` slices."""
    first, last = (0, slices - 1) if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
    if not 0 <= first <= last < slices:
        raise GeometryError(f"The slice range {first} to {last} is not inside the volume (slices 0 to "
                            f"{slices - 1}); the first slice must not come after the last.")
    return first, last
