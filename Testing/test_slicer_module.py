"""The Slicer module's logic on REAL MRML nodes (the slicer-core wheel) and a REAL server (uvicorn around a tiny
MiniGPT-v2 of the real code), plus checks of the module's files (CMake lists, .ui names, icon, prompt copies).

Expectations are computed independently of the module: volume geometry from the phantom's own matrix (and by hand
for two storage orientations), ROI positions from SlicerMiniGPTPancreas.geometry.ModelView, truth boxes slice by
slice with geometry.mask_box, IoU values by hand, the slices the server saw recorded inside its engine.
"""

from __future__ import annotations

import ast
import re
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")  # the slicer-core wheel: MRML without the Slicer application
import vtk  # noqa: E402  (installed with slicer-core)

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "MiniGPTPancreasModule"
sys.path.insert(0, str(MODULE_DIR))

from MiniGPTPancreasLib import boxes_to_markups, ground_truth, prompts, volume_geometry  # noqa: E402
from MiniGPTPancreasLib.boxes_to_markups import PlacedBox, add_box_rois, roi_world_center_and_size  # noqa: E402
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic, SweepOutcome  # noqa: E402
from MiniGPTPancreasLib.summaries import describe_response, describe_sweep  # noqa: E402
from MiniGPTPancreasLib.worker import FAILED, FINISHED, PROGRESS, BackgroundTask  # noqa: E402
from SlicerMiniGPTPancreas.geometry import GeometryError, ModelView, ObliqueVolumeError, mask_box  # noqa: E402
from SlicerMiniGPTPancreas.phantom import make_phantom, reorient  # noqa: E402

WAIT_S = 20.0
REFER = prompts.PRESETS[0].prompt
# A linear transform that keeps the grid axis-aligned: 90 degrees about S (x -> y), then a shift.
ROTATE_90_AND_SHIFT = np.array([[0.0, -1.0, 0.0, 12.5], [1.0, 0.0, 0.0, -7.0], [0.0, 0.0, 1.0, 30.0], [0, 0, 0, 1]])


# ----------------------------------------------------------------------------------------------- helpers

@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, noise_hu=0.0)


def add_transform(scene, matrix):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(volume_geometry.numpy_to_matrix(matrix))
    return node


def add_ct(scene, ph, transform=None, name="CT"):
    """A scalar volume node holding the phantom, optionally under a linear transform."""
    node = volume_geometry.add_volume_node(scene, ph.hu, ph.ijk_to_ras, name)
    if transform is not None:
        node.SetAndObserveTransformNodeID(add_transform(scene, transform).GetID())
    return node


def expected_view(ph, transform=None):
    """The model view of the phantom in world RAS, straight from its arrays and matrix."""
    world = ph.ijk_to_ras if transform is None else transform @ ph.ijk_to_ras
    return ModelView.from_volume(ph.hu, world)


def truth_slices(labels_kji, matrix, values):
    """{s: box} computed slice by slice with the core's mask_box."""
    view = ModelView.from_volume(np.isin(labels_kji, values), matrix)
    boxes = {s: mask_box(view.slice(s)) for s in range(view.shape[0])}
    return {s: box for s, box in boxes.items() if box is not None}


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
    assert volume_geometry.current_model_slice(node, axial_slice_node(scene, centre_of_slice_23)) == 23
    with pytest.raises(volume_geometry.VolumeNodeError, match="not axial"):
        volume_geometry.current_model_slice(node, axial_slice_node(scene, centre_of_slice_23, (1.0, 0.0, 0.0)))
    below = centre_of_slice_23 - [0, 0, 24 * view.spacing[2]]
    with pytest.raises(GeometryError, match="outside the volume"):
        volume_geometry.current_model_slice(node, axial_slice_node(scene, below))


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
             PlacedBox(19, (0, 0, 5, 9), 0.5, "tumour")]
    run = add_box_rois(scene, volume_geometry.model_view_geometry(node), boxes, label="pancreas",
                       volume_node=node, add_fused_roi=True)
    view = expected_view(ph, transform)
    assert [roi.GetName() for roi in run.rois] == ["pancreas s12 (0.87)", "pancreas s12", "tumour s19 (0.50)"]
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
    assert run.fused.GetName() == "pancreas 3D (slices 12-19, 3 boxes)"
    assert set(sh_children(scene, run.folder_item)) == set(run.rois + [run.fused])
    second = add_box_rois(scene, view, boxes[:1], label="tumour")
    assert second.title == "MiniGPT-Pancreas run 2: tumour" and second.fused is None
    assert sh_children(scene, second.folder_item) == second.rois


def test_without_subject_hierarchy_the_run_title_goes_into_names(scene, phantom, monkeypatch):
    monkeypatch.setattr(boxes_to_markups, "_subject_hierarchy", lambda scene: None)
    run = add_box_rois(scene, expected_view(phantom), [PlacedBox(3, (1, 2, 3, 4), 0.25)], label="liver")
    assert run.folder_item is None
    assert run.rois[0].GetName() == "MiniGPT-Pancreas run 1: liver / liver s3 (0.25)"


# ----------------------------------------------------------------------------------------------- ground truth

@pytest.fixture
def ct_and_labels(scene, phantom):
    ct = add_ct(scene, phantom, ROTATE_90_AND_SHIFT)
    labels = volume_geometry.add_volume_node(scene, phantom.labels, phantom.ijk_to_ras, "labels",
                                             "vtkMRMLLabelMapVolumeNode")
    labels.SetAndObserveTransformNodeID(ct.GetTransformNodeID())
    return ct, labels


def test_truth_boxes_from_a_label_map_on_the_ct_grid(ct_and_labels, phantom):
    ct, labels = ct_and_labels
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    for values in ([1, 2], [2]):
        mask = ground_truth.truth_mask(labels, ct, label_values=values)
        got = ground_truth.truth_boxes(mask, volume_geometry.world_ijk_to_ras(ct))
        assert got == truth_slices(phantom.labels, world, values) and got
    assert ground_truth.truth_mask(labels, ct).sum() == (phantom.labels > 0).sum()


def test_truth_from_a_label_map_stored_another_way_is_resampled_onto_the_ct_grid(scene, phantom):
    ct = add_ct(scene, phantom)
    other = reorient(phantom, "RPI")  # same voxels, stored inferior-first and flipped
    labels = volume_geometry.add_volume_node(scene, other.labels, other.ijk_to_ras, "labels RPI",
                                             "vtkMRMLLabelMapVolumeNode")
    mask = ground_truth.truth_mask(labels, ct, label_values=[1, 2])
    assert np.array_equal(mask, phantom.labels > 0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # the temporary nodes are gone


def test_truth_from_a_segmentation_node(ct_and_labels, phantom, scene):
    ct, labels = ct_and_labels
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation)
    segments = segmentation.GetSegmentation()
    ids = {segments.GetNthSegment(i).GetLabelValue(): segments.GetNthSegmentID(i)
           for i in range(segments.GetNumberOfSegments())}
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    both = ground_truth.truth_mask(segmentation, ct)
    assert np.array_equal(both, phantom.labels > 0)
    tumour = ground_truth.truth_mask(segmentation, ct, segment_ids=[ids[2]])
    assert ground_truth.truth_boxes(tumour, world) == truth_slices(phantom.labels, world, [2])
    with pytest.raises(ground_truth.GroundTruthError, match="no segment.*it has"):
        ground_truth.truth_mask(segmentation, ct, segment_ids=["nonexistent"])
    choices = ground_truth.truth_choices(segmentation)
    assert [title for title, _ in choices][0] == "All segments" and len(choices) == 3
    for title, selection in choices[1:]:  # each segment's choice selects exactly its label's voxels
        label = next(value for value, segment_id in ids.items() if selection == {"segment_ids": [segment_id]})
        assert np.array_equal(ground_truth.truth_mask(segmentation, ct, **selection), phantom.labels == label)


def test_label_map_choices_name_every_label_present(ct_and_labels):
    _, labels = ct_and_labels
    assert ground_truth.truth_choices(labels) == [("All labels (nonzero)", {}), ("Label 1", {"label_values": [1]}),
                                                  ("Label 2", {"label_values": [2]})]
    assert ground_truth.truth_choices(None) == []


def test_iou_table_for_hand_made_predictions(ct_and_labels, phantom):
    ct, labels = ct_and_labels
    world = ROTATE_90_AND_SHIFT @ phantom.ijk_to_ras
    truths = truth_slices(phantom.labels, world, [1, 2])
    shifted_s, missed_s, split_s = sorted(truths)[:3]
    x0, y0, x1, y1 = truths[shifted_s]
    empty = [s for s in range(expected_view(phantom, ROTATE_90_AND_SHIFT).shape[0]) if s not in truths]
    false_alarm_s, quiet_s = empty[0], empty[1]
    a0, b0, a1, b1 = truths[split_s]
    predictions = {
        shifted_s: [(x0 + 1, y0, x1 + 1, y1)],  # one pixel to the right: IoU (w - 1) / (w + 1)
        missed_s: [],  # the model found nothing where the truth has a box: IoU 0
        split_s: [(a0, b0, a1, b1 - 1), (a0, b1 - 1, a1, b1)],  # two boxes whose enclosing box is the truth: 1
        false_alarm_s: [(5, 5, 9, 9)],  # a box where the truth has none: IoU 0
        quiet_s: [],  # nothing and nothing: left out of the mean
    }
    width = x1 - x0 + 1
    shifted_iou = (width - 1) / (width + 1)
    comparison = MiniGPTPancreasLogic().compare_with_ground_truth(ct, labels, predictions, label_values=[1, 2])
    table = comparison.table_node.GetTable()
    read = {table.GetValueByName(r, "slice").ToString(): r for r in range(table.GetNumberOfRows())}
    assert list(read) == [str(s) for s in sorted(predictions)] + ["mean"]
    iou = {s: table.GetValueByName(read[str(s)], "IoU").ToDouble() for s in predictions}
    assert iou[shifted_s] == pytest.approx(shifted_iou)
    assert (iou[missed_s], iou[split_s], iou[false_alarm_s]) == (0.0, pytest.approx(1.0), 0.0)
    assert np.isnan(iou[quiet_s])
    want_mean = (shifted_iou + 0.0 + 1.0 + 0.0) / 4
    assert comparison.mean_iou == pytest.approx(want_mean)
    assert table.GetValueByName(read["mean"], "IoU").ToDouble() == pytest.approx(want_mean)
    assert table.GetValueByName(read[str(missed_s)], "predicted box").ToString() == "none"
    assert table.GetValueByName(read[str(shifted_s)], "truth box").ToString() == f"({x0}, {y0}, {x1}, {y1})"


# ------------------------------------------------------------------------------------------------- worker

def test_background_task_reports_progress_then_its_result():
    task = BackgroundTask(lambda report, cancelled: [report(i) for i in range(3)] and "done")
    task.start()
    assert task.wait(WAIT_S)
    assert [(e.kind, e.payload) for e in task.drain()] == [(PROGRESS, 0), (PROGRESS, 1), (PROGRESS, 2),
                                                           (FINISHED, "done")]
    assert task.drain() == []


def test_background_task_hands_failures_and_cancel_requests_over():
    failing = BackgroundTask(lambda report, cancelled: 1 / 0)
    failing.start()
    failing.wait(WAIT_S)
    (event,) = failing.drain()
    assert event.kind == FAILED and isinstance(event.payload, ZeroDivisionError)
    started = threading.Event()

    def until_cancelled(report, cancelled):
        started.set()
        while not cancelled():
            time.sleep(0.005)
        return "stopped"

    task = BackgroundTask(until_cancelled)
    task.start()
    assert started.wait(WAIT_S) and not task.ended
    task.cancel()
    assert task.wait(WAIT_S) and task.cancel_requested
    assert [e.payload for e in task.drain()] == ["stopped"]


# ----------------------------------------------------------------------------------- against a real server

class Gate:
    """The service's before_batch hook: open by default; while closed, the engine thread waits at its next batch."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.holding = threading.Event()  # the engine thread is waiting at the gate

    def __call__(self) -> None:
        if not self._open.is_set():
            self.holding.set()
            self._open.wait(WAIT_S)

    def close(self) -> None:
        self.holding.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real service (backend.service.create_app) around a tiny MiniGPT-v2 whose engine records what it saw."""
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    from backend.checkpoints import load_upstream
    from backend.engine import InferenceEngine
    from backend.service import create_app
    from backend.tiny_upstream import build_tiny_upstream

    class RecordingEngine(InferenceEngine):
        """The real engine; it also keeps a copy of every slice it was asked about."""

        seen: list[np.ndarray] = []

        def run(self, slices_hu, prompts, **options):
            self.seen.extend(np.array(s) for s in slices_hu)
            return super().run(slices_hu, prompts, **options)

    files = build_tiny_upstream(tmp_path_factory.mktemp("tiny_upstream"))
    model = load_upstream(files.vit_checkpoint, files.llama_dir, files.minigpt_checkpoint,
                          image_size=files.sizes.image_size)
    engine = RecordingEngine(model, batch_size=4, model_id="tiny-slicer-test")
    gate = Gate()
    with LiveServer(create_app(engine, constrain_boxes=True, before_batch=gate)) as server:
        server.engine, server.gate = engine, gate
        yield server


@pytest.fixture
def logic(live):
    live.engine.seen.clear()
    logic = MiniGPTPancreasLogic(poll_interval_s=0.02)
    logic.set_server(live.url, read_timeout=WAIT_S)
    return logic


def rois_of_run(scene, number):
    nodes = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsROINode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode"))]
    return [n for n in nodes if n.GetAttribute(boxes_to_markups.RUN_ATTRIBUTE) == str(number)]


def test_check_server_reads_the_health_of_the_real_service(logic):
    health = logic.check_server()
    assert (health.status, health.model_id) == ("ok", "tiny-slicer-test")


@pytest.mark.parametrize("orientation", ["RAS", "LSP"])
def test_analyze_slice_sends_the_model_view_slice_and_draws_its_boxes(logic, live, scene, phantom, orientation):
    ph = reorient(phantom, orientation)
    node = add_ct(scene, ph, ROTATE_90_AND_SHIFT)
    view = expected_view(ph, ROTATE_90_AND_SHIFT)
    s = sorted(truth_slices(phantom.labels, phantom.ijk_to_ras, [1]))[0] + 1
    response = logic.analyze_slice(node, s, REFER, scene)
    assert len(live.engine.seen) == 1 and np.array_equal(live.engine.seen[0], view.slice(s))
    assert response.kind == "boxes" and response.slice_index == s and len(response.boxes) == 1
    (roi,) = rois_of_run(scene, 1)
    box = response.boxes[0]
    assert roi.GetName() == f"pancreas s{s} ({box.confidence:.2f})"
    center, size = roi_world_center_and_size(roi)
    want_center, want_size = view.box_to_ras(box.box, s)
    np.testing.assert_allclose(center, want_center, atol=1e-6)
    np.testing.assert_allclose(size, want_size, atol=1e-6)
    with pytest.raises(GeometryError, match="outside the volume"):
        logic.analyze_slice(node, view.shape[0], REFER, scene)


def test_sweep_uploads_the_range_once_reports_progress_and_draws_every_box(logic, live, scene, phantom):
    node = add_ct(scene, phantom)
    view = expected_view(phantom)
    first, last = 14, 19
    progress = []
    uploads_before = len(live.app.state.service.volumes)
    outcome = logic.sweep_volume(node, REFER, (first, last), lambda done, total: progress.append((done, total)))
    assert (outcome.state, outcome.done, outcome.total) == ("done", 6, 6)
    assert sorted(outcome.responses) == list(range(first, last + 1))
    assert np.array_equal(np.stack(live.engine.seen), view.array[first:last + 1])
    assert progress[-1] == (6, 6) and progress == sorted(progress)
    rois = [roi for roi in rois_of_run(scene, 1) if not roi.GetAttribute("MiniGPTPancreas.fused")]
    assert len(rois) == sum(len(r.boxes) for r in outcome.responses.values())
    for roi in rois:
        s = int(roi.GetAttribute("MiniGPTPancreas.slice"))
        (box,) = outcome.responses[s].boxes
        center, _ = roi_world_center_and_size(roi)
        np.testing.assert_allclose(center, view.box_to_ras(box.box, s)[0], atol=1e-6)
    again = logic.sweep_volume(node, prompts.PRESETS[2].prompt, (first, last))
    assert again.state == "done"
    assert len(live.app.state.service.volumes) == uploads_before + 1  # the second prompt reused the upload
    assert describe_sweep(outcome.state, outcome.done, outcome.total, outcome.responses).startswith("Boxes on ")
    live.app.state.service.volumes.clear()  # as after a server restart: the volume id is stale
    assert logic.sweep_volume(node, REFER, (first, last)).state == "done"
    assert len(live.app.state.service.volumes) == 1  # sent again, once


def test_cancelling_a_sweep_stops_it_on_the_server(logic, live, scene, phantom):
    node = add_ct(scene, phantom)
    live.gate.close()  # the engine thread will wait before the sweep's first batch
    try:
        outcome = logic.sweep_volume(node, REFER, (0, 9), should_cancel=live.gate.holding.is_set)
    finally:
        live.gate.open()
    assert isinstance(outcome, SweepOutcome)
    assert (outcome.state, outcome.done, outcome.responses) == ("cancelled", 0, {})
    assert rois_of_run(scene, 1) == []


def test_status_lines_give_the_answer_and_its_probability():
    from SlicerMiniGPTPancreas import protocol as p

    def yes_no(yes, probability, s):
        return p.QueryResponse("yes" if yes else "no", "yes_no", "m", yes=yes, yes_probability=probability,
                               slice_index=s)

    assert describe_response(yes_no(True, 0.834, 4), 4) == "Yes (P(yes) = 0.83) on slice 4."
    nothing = p.QueryResponse("{<0><0><0><0>}", "boxes", "m", reason="the model says it is absent")
    assert describe_response(nothing, 7) == "Nothing found on slice 7: the model says it is absent"
    sweep = {3: yes_no(True, 0.6, 3), 4: yes_no(False, 0.2, 4)}
    assert describe_sweep("cancelled", 2, 5, sweep, "cancelled after 2 of 5 slices") == (
        "Sweep cancelled after 2 of 5 slices. Yes on 1 of 2 slices (highest P(yes) 0.60 on slice 3).")
    assert describe_sweep("failed", 0, 5, {}, "the GPU ran out of memory") == (
        "Sweep failed after 0 of 5 slices: the GPU ran out of memory. Boxes on 0 of 0 slices.")


# ------------------------------------------------------------------------------------- the module's files

def test_prompt_presets_are_the_backends_prompts():
    from backend import prompts as backend_prompts

    by_key = {preset.key: preset.prompt for preset in prompts.PRESETS}
    assert by_key["pancreas"] == backend_prompts.refer_eval_instruction(backend_prompts.PANCREAS_PHRASE)
    assert by_key["tumour"] == backend_prompts.refer_eval_instruction(backend_prompts.TUMOR_PHRASE)
    assert by_key["tumour_yes_no"] == backend_prompts.TC_EVAL_PROMPT
    for organ in ("liver", "kidney", "spleen"):
        assert organ in backend_prompts.ABD_ORGANS
        assert by_key[organ] == backend_prompts.refer_eval_instruction(organ)


@pytest.mark.parametrize("prompt, label", [
    (prompts.PRESETS[1].prompt, "tumour"),
    ("[refer] where is the gallbladder ?", "gallbladder"),
    ("[refer] give me the position of the left kidney", "left kidney"),
    ("[vqa] what organ is this?", "box"),
])
def test_box_labels_follow_the_prompt(prompt, label):
    assert prompts.box_label_for_prompt(prompt) == label


def test_every_widget_the_code_uses_is_in_the_ui_and_bound_parameters_match_the_parameter_node():
    ui = ElementTree.parse(ROOT / "Resources" / "UI" / "MiniGPTPancreas.ui")
    names = {widget.get("name") for widget in ui.iter("widget")}
    source = (MODULE_DIR / "MiniGPTPancreas.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= names, f"missing in the .ui: {sorted(used - names)}"
    bound = {prop.findtext("string") for prop in ui.iter("property") if prop.get("name") == "SlicerParameterName"}
    (wrapper,) = [node for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.ClassDef) and node.name == "MiniGPTPancreasParameterNode"]
    fields = {item.target.id for item in wrapper.body if isinstance(item, ast.AnnAssign)}
    assert bound == fields == {"inputVolume", "prompt", "sweep", "firstSlice", "lastSlice"}


def core_modules_imported_by(path: Path) -> set[str]:
    """Modules of SlicerMiniGPTPancreas that `path` imports (absolute or, inside the core, relative)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        inside_core = node.level == 1 and path.parent.name == "SlicerMiniGPTPancreas"
        if node.module and node.module.startswith("SlicerMiniGPTPancreas."):
            found.add(node.module.split(".")[1])
        elif node.module == "SlicerMiniGPTPancreas" or (inside_core and node.module is None):
            found.update(alias.name for alias in node.names)
        elif inside_core:
            found.add(node.module.split(".")[0])
    return found


def test_cmake_installs_every_module_file_and_every_core_module_the_module_needs():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed_lib = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", cmake))
    assert listed_lib == {path.name for path in (MODULE_DIR / "MiniGPTPancreasLib").glob("*.py")}
    core_block = re.search(r"set\(CORE_MODULES\s+([^)]*)\)", cmake).group(1)
    listed_core = set(core_block.split())
    needed = {"__init__"}
    pending = [MODULE_DIR / "MiniGPTPancreas.py", *(MODULE_DIR / "MiniGPTPancreasLib").glob("*.py")]
    while pending:
        for name in core_modules_imported_by(pending.pop()) - needed:
            needed.add(name)
            pending.append(ROOT / "SlicerMiniGPTPancreas" / f"{name}.py")
    assert needed <= listed_core, f"not installed with the module: {sorted(needed - listed_core)}"
    assert all((ROOT / "SlicerMiniGPTPancreas" / f"{name}.py").is_file() for name in listed_core)
    resources = re.findall(r"^\s+(UI/\S+|Icons/\S+)$", cmake, re.MULTILINE)
    assert sorted(resources) == ["Icons/${MODULE_NAME}.png", "UI/${MODULE_NAME}.ui"]
    assert all((ROOT / "Resources" / r.replace("${MODULE_NAME}", "MiniGPTPancreas")).is_file() for r in resources)


def test_module_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(ROOT / "Resources" / "Icons" / "MiniGPTPancreas.png") as icon:
        assert (icon.format, icon.size) == ("PNG", (128, 128))
