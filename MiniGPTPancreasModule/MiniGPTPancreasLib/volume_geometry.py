"""From a Slicer volume node to the model view of the shared core, in world coordinates.

A volume node stores its voxels [k, j, i] and an IJK-to-RAS matrix in its own "node" RAS; parent transforms move it
into the world RAS where views, markups and other nodes live. Everything the module computes (boxes, ROIs, truth
boxes) uses the world matrix, so a volume under a linear transform gets its boxes where it is displayed. Non-linear
(warping) transforms are refused: a warped volume has no voxel grid in world space to draw axis-aligned boxes on.

Runs with the `slicer-core` wheel: only MRML node APIs and `slicer.util` array helpers are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import vtk
from slicer.util import arrayFromVolume, updateVolumeFromArray

from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import GeometryError, ModelView, ObliqueVolumeError

AXIAL_TOLERANCE = 1e-3  # largest off-axis component of a slice normal still read as axial


class VolumeNodeError(UserError, ValueError):
    """The node cannot be analysed as it is (no voxels, a label map, colour voxels, a warping transform...)."""


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """[4, 4] float64 copy of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A vtkMatrix4x4 holding the [4, 4] array."""
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def node_to_world_matrix(node: Any) -> np.ndarray:
    """[4, 4] node-RAS -> world-RAS matrix of a transformable node (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise VolumeNodeError(
            f"'{node.GetName()}' is under a non-linear (warping) transform ('{parent.GetName()}'). "
            "MiniGPT-Pancreas needs the voxel grid in world space: harden the transform into a resampled volume "
            "(Transforms module: Harden transform, or resample the volume), or remove the transform, then try again."
        )
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world)


def world_ijk_to_ras(volume_node: Any) -> np.ndarray:
    """[4, 4] matrix mapping the node's (i, j, k, 1) to world RAS mm, parent transforms included."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world_matrix(volume_node) @ matrix_to_numpy(ijk_to_ras)


def volume_array_and_matrix(volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """(voxels [K, J, I], world ijk_to_ras [4, 4]) of a scalar volume node. The array is a view of the node's voxels:
    read it on the main thread and copy what a worker thread needs."""
    _check_scalar_volume(volume_node)
    array_kji = arrayFromVolume(volume_node)
    if array_kji.ndim != 3:
        raise VolumeNodeError(
            f"'{volume_node.GetName()}' has {array_kji.shape[-1]} values per voxel (a colour or vector volume). "
            "Choose the single-channel CT volume."
        )
    return array_kji, world_ijk_to_ras(volume_node)


def model_view(volume_node: Any) -> ModelView:
    """The model view [S, R, C] of the node's voxels (a view, not a copy) in world RAS."""
    array_kji, matrix = volume_array_and_matrix(volume_node)
    return _checked_model_view(volume_node, array_kji, matrix)


def model_view_geometry(volume_node: Any) -> ModelView:
    """A ModelView with the node's geometry but no voxels (a zero-size placeholder array of the right shape).

    Safe to keep and to use from any thread for box_to_ras / model_to_ras_matrix, whatever happens to the node.
    """
    _check_scalar_volume(volume_node)
    dimensions = volume_node.GetImageData().GetDimensions()  # (I, J, K)
    placeholder = np.broadcast_to(np.zeros((), dtype=np.int16), tuple(reversed(dimensions)))  # [K, J, I], no memory
    return _checked_model_view(volume_node, placeholder, world_ijk_to_ras(volume_node))


def model_slice_at_ras(view: ModelView, point_ras: np.ndarray) -> int:
    """The model-view slice s holding the world RAS point; raises GeometryError outside the volume."""
    model = np.linalg.solve(view.model_to_ras_matrix, np.append(np.asarray(point_ras, dtype=np.float64), 1.0))
    s = int(np.floor(model[2] + 0.5))
    if not 0 <= s < view.shape[0]:
        raise GeometryError(
            f"The slice shown is outside the volume (model-view slice {s}, the volume has 0 to {view.shape[0] - 1}). "
            "Scroll the view into the volume."
        )
    return s


def current_model_slice(view: ModelView, slice_node: Any) -> int:
    """The model-view slice s of `view` (a volume's model_view_geometry, or the resampled grid a sweep of a tilted
    volume is on) that an axial slice view (vtkMRMLSliceNode) shows."""
    slice_to_ras = matrix_to_numpy(slice_node.GetSliceToRAS())
    normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
    if np.linalg.norm(normal[:2]) > AXIAL_TOLERANCE:
        raise VolumeNodeError(
            f"The view '{slice_node.GetName()}' is not axial (its slice normal is {np.round(normal, 3).tolist()}). "
            "MiniGPT-Pancreas reads axial slices: set the view's orientation to Axial, or choose a slice range."
        )
    return model_slice_at_ras(view, slice_to_ras[:3, 3])


def slice_center_ras(view: ModelView, s: int) -> np.ndarray:
    """World RAS [3] of the centre of model-view slice s (where a view jumps to show that slice)."""
    rows, cols = view.shape[1:]
    return (view.model_to_ras_matrix @ np.array([(cols - 1) / 2.0, (rows - 1) / 2.0, float(s), 1.0]))[:3]


def slicer_slice_label(view: ModelView, s: int) -> str:
    """Model-view slice s as Slicer shows it: the voxel K index (Data Probe) and the axial offset S in mm (the
    slice view's slider), e.g. 'K 57, S -12.5 mm'."""
    k = int(view.model_to_ijk(0, 0, int(s))[2])
    return f"K {k}, S {slice_center_ras(view, s)[2]:.1f} mm"


def first_ct_volume(scene: Any) -> Any:
    """The first scalar volume that is not a label map (None when there is none): the module's default input."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def to_int16_hu(array: np.ndarray) -> np.ndarray:
    """A C-contiguous int16 copy of HU values (floats rounded; values beyond int16 clipped), as the protocol sends."""
    if array.dtype == np.int16:
        return np.array(array, dtype=np.int16, order="C", copy=True)
    if array.dtype.kind == "f":
        array = np.rint(array)
    return np.clip(array, -32768, 32767).astype(np.int16, order="C")


def add_volume_node(scene: Any, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str,
                    class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in `scene` holding a copy of `array_kji` [K, J, I] with the given IJK-to-RAS matrix."""
    node = scene.AddNewNodeByClass(class_name, name)
    updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    node.SetIJKToRASMatrix(numpy_to_matrix(np.asarray(ijk_to_ras, dtype=np.float64)))
    node.CreateDefaultDisplayNodes()
    return node


def _check_scalar_volume(volume_node: Any) -> None:
    if volume_node is None:
        raise VolumeNodeError("No volume is selected. Choose the CT volume to analyse.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise VolumeNodeError(f"'{volume_node.GetName()}' is a {volume_node.GetClassName()}, not a scalar volume. "
                              "Choose the CT volume.")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VolumeNodeError(f"'{volume_node.GetName()}' is a label map. Choose the CT volume; label maps serve as "
                              "ground truth in the comparison section.")
    image = volume_node.GetImageData()
    if image is None or 0 in image.GetDimensions():
        raise VolumeNodeError(f"'{volume_node.GetName()}' has no voxels. Load the CT volume again.")


def _checked_model_view(volume_node: Any, array_kji: np.ndarray, matrix: np.ndarray) -> ModelView:
    try:
        return ModelView.from_volume(array_kji, matrix)
    except ObliqueVolumeError as error:
        if volume_node.GetParentTransformNode() is None:
            raise
        raise ObliqueVolumeError(
            f"{error} Note: '{volume_node.GetName()}' is under the transform "
            f"'{volume_node.GetParentTransformNode().GetName()}', which rotates it; the tilt may come from there."
        ) from error

