"""The Slicer module's volume geometry on REAL MRML nodes (the slicer-core wheel): world matrices under parent
transforms, refusals of warps, oblique grids and label maps, the current axial slice, and ROI markups per box.

Expectations are computed independently of the module: volume geometry from the phantom's own matrix (and by hand
for two storage orientations), ROI positions from SlicerMiniGPTPancreas.geometry.ModelView.
"""

from __future__ import annotations

import numpy as np
import pytest

# slicer_fixtures first: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import ROTATE_90_AND_SHIFT, add_ct, expected_view

import vtk  # noqa: E402  (installed with slicer-core)
from MiniGPTPancreasLib import boxes_to_markups, volume_geometry
from MiniGPTPancreasLib.boxes_to_markups import PlacedBox, add_box_rois, roi_world_center_and_size
from MiniGPTPancreasLib.fusion import apply_threshold
from SlicerMiniGPTPancreas.geometry import GeometryError, ObliqueVolumeError
from SlicerMiniGPTPancreas.phantom import reorient


# ----------------------------------------------------------------------------------------- volume geometry

@pytest.mark.parametrize("orientation", ["LPS", "RAS", "RPI", "ASL"])
@pytest.mark.parametrize("transform", [None, ROTATE_90_AND_SHIFT], ids=["no-transform", "rotate-shift"])
def test_world_matrix_and_model_view_include_the_parent_transform(scene, phantom, orientation, transform):
    ph = reorient(phantom, orientation)
    node = add_ct(scene, ph, transform)
    stored = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(stored)
    np.testing.assert_allclose(volume_geometry.matrix_to_numpy(stored), ph.ijk_to_ras, atol=1e-9)
    world = ph.ijk_to_ras if transform is None else transform @ ph.ijk_to_ras
    np.testing.assert_allclose(volume_geometry.world_ijk_to_ras(node), world, atol=1e-9)
    view = volume_geometry.model_view(node)
    assert np.array_equal(view.array, expected_view(ph, transform).array)
    geometry_only = volume_geometry.model_view_geometry(node)
    np.testing.assert_allclose(geometry_only.model_to_ras_matrix, view.model_to_ras_matrix)


def test_model_view_by_hand_for_dicom_and_nifti_storage(scene, phantom):
    lps = volume_geometry.model_view(add_ct(scene, reorient(phantom, "LPS"), name="lps"))
    ras = volume_geometry.model_view(add_ct(scene, reorient(phantom, "RAS"), name="ras"))
    hu_lps, hu_ras = reorient(phantom, "LPS").hu, reorient(phantom, "RAS").hu
    assert np.array_equal(lps.slice(17), hu_lps[17])  # LPS storage is the model view as is
    assert np.array_equal(ras.slice(17), hu_ras[17, ::-1, ::-1])  # RAS: rows and columns run the other way


def test_warping_transform_is_refused_with_advice(scene, phantom):
    node = add_ct(scene, phantom)
    warp = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for point, moved in [((0, 0, 0), (1, 0, 0)), ((50, 0, 0), (50, 4, 0)), ((0, 50, 0), (0, 50, 3)),
                         ((0, 0, 50), (2, 0, 50))]:
        source.InsertNextPoint(*point)
        target.InsertNextPoint(*moved)
    warp.SetSourceLandmarks(source)
    warp.SetTargetLandmarks(target)
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    transform.SetAndObserveTransformToParent(warp)
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(volume_geometry.VolumeNodeError, match="non-linear.*harden"):
        volume_geometry.world_ijk_to_ras(node)


def test_a_rotating_transform_is_refused_as_oblique_naming_the_transform(scene, phantom):
    tilt = np.eye(4)
    tilt[:3, :3] = [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
    node = add_ct(scene, phantom, tilt)
    with pytest.raises(ObliqueVolumeError, match="oblique.*under the transform"):
        volume_geometry.model_view(node)


def test_label_maps_and_empty_nodes_are_refused_as_ct(scene, phantom):
    labels = volume_geometry.add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "seg",
                                             "vtkMRMLLabelMapVolumeNode")
    with pytest.raises(volume_geometry.VolumeNodeError, match="label map"):
        volume_geometry.model_view(labels)
    with pytest.raises(volume_geometry.VolumeNodeError, match="no voxels"):
        volume_geometry.model_view(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"))


def axial_slice_node(scene, point_ras, normal=(0.0, 0.0, 1.0)):
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    matrix = np.eye(4)
    if normal != (0.0, 0.0, 1.0):  # sagittal: slice x = A, y = S, normal = R
        matrix[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    matrix[:3, 3] = point_ras
    node.GetSliceToRAS().DeepCopy(volume_geometry.numpy_to_matrix(matrix))
    node.UpdateMatrices()
    return node


@pytest.mark.parametrize("orientation", ["LPS", "RPI"])
def test_current_slice_of_an_axial_view(scene, phantom, orientation):
    ph = reorient(phantom, orientation)
    node = add_ct(scene, ph, ROTATE_90_AND_SHIFT)
    view = expected_view(ph, ROTATE_90_AND_SHIFT)
    centre_of_slice_23 = (view.model_to_ras_matrix @ [10.0, 20.0, 23.0, 1.0])[:3]
    geometry = volume_geometry.model_view_geometry(node)
    assert volume_geometry.current_model_slice(geometry, axial_slice_node(scene, centre_of_slice_23)) == 23
    with pytest.raises(volume_geometry.VolumeNodeError, match="not axial"):
        volume_geometry.current_model_slice(geometry, axial_slice_node(scene, centre_of_slice_23, (1.0, 0.0, 0.0)))
    below = centre_of_slice_23 - [0, 0, 24 * view.spacing[2]]
    with pytest.raises(GeometryError, match="outside the volume"):
        volume_geometry.current_model_slice(geometry, axial_slice_node(scene, below))


def test_int16_conversion_rounds_and_clips():
    values = np.array([[-40000.0, -1.5, 2.4, 40000.0]], dtype=np.float32)
    assert volume_geometry.to_int16_hu(values).tolist() == [[-32768, -2, 2, 32767]]
    assert volume_geometry.to_int16_hu(np.array([[70000]], dtype=np.int32)).dtype == np.int16


# ----------------------------------------------------------------------------------------------- ROI markups

def sh_children(scene, folder_item):
    sh_node = scene.GetSubjectHierarchyNode()
    children = vtk.vtkIdList()
    sh_node.GetItemChildren(folder_item, children)
    return [sh_node.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "ASL"])
@pytest.mark.parametrize("transform", [None, ROTATE_90_AND_SHIFT], ids=["no-transform", "rotate-shift"])
def test_rois_sit_where_the_core_geometry_puts_the_boxes(scene, phantom, orientation, transform):
    ph = reorient(phantom, orientation)
    node = add_ct(scene, ph, transform)
    boxes = [PlacedBox(12, (10, 20, 30, 35), 0.87), PlacedBox(12, (40.5, 41, 44, 50.25)),
             PlacedBox(13, (0, 0, 5, 9), 0.5, "tumour")]
    run = add_box_rois(scene, volume_geometry.model_view_geometry(node), boxes, label="pancreas",
                       volume_node=node)
    run.fused = apply_threshold(scene, run.number, 0.0, "pancreas")
    view = expected_view(ph, transform)
    assert [roi.GetName() for roi in run.rois] == ["pancreas s12 (0.87)", "pancreas s12", "tumour s13 (0.50)"]
    for roi, box in zip(run.rois, boxes):
        center, size = roi_world_center_and_size(roi)
        want_center, want_size = view.box_to_ras(box.box, box.slice_index)
        np.testing.assert_allclose(center, want_center, atol=1e-6)
        np.testing.assert_allclose(size, want_size, atol=1e-6)
        assert np.isclose(size[2], view.spacing[2])  # exactly one slice thick
        assert roi.GetLocked() and not roi.GetDisplayNode().GetHandlesInteractive()
    corners = np.concatenate([view.box_to_ras_corners(b.box, b.slice_index) for b in boxes])
    fused_center, fused_size = roi_world_center_and_size(run.fused)
    np.testing.assert_allclose(fused_center, (corners.min(0) + corners.max(0)) / 2, atol=1e-6)
    np.testing.assert_allclose(fused_size, corners.max(0) - corners.min(0), atol=1e-6)
    assert run.fused.GetName() == "pancreas 3D (slices 12-13, 3 boxes >= 0.00)"
    assert set(sh_children(scene, run.folder_item)) == set(run.rois + [run.fused])
    second = add_box_rois(scene, view, boxes[:1], label="tumour")
    assert second.title == "MiniGPT-Pancreas run 2: tumour" and second.fused is None
    assert sh_children(scene, second.folder_item) == second.rois


def test_without_subject_hierarchy_the_run_title_goes_into_names(scene, phantom, monkeypatch):
    monkeypatch.setattr(boxes_to_markups, "subject_hierarchy", lambda scene: None)
    run = add_box_rois(scene, expected_view(phantom), [PlacedBox(3, (1, 2, 3, 4), 0.25)], label="liver")
    assert run.folder_item is None
    assert run.rois[0].GetName() == "MiniGPT-Pancreas run 1: liver / liver s3 (0.25)"
