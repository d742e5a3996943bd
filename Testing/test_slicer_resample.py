"""The Slicer module's logic sweeping a gantry-tilted volume node (real MRML nodes from the slicer-core wheel) on a
REAL server (uvicorn around a tiny MiniGPT-v2): refused naming the logic's resample_tilted option, or uploaded as
stored for the server to resample, with every ROI where the resampled grid puts its box and the slices the model saw
showing the patient's block where it is (tilted_volume.py)."""

from __future__ import annotations

import numpy as np
import pytest

from live_server import LiveServer
# slicer_fixtures before the Lib: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import REFER, WAIT_S
from tilted_volume import assert_block_boxes_cover_the_block, tilted_ct

from MiniGPTPancreasLib.boxes_to_markups import roi_world_center_and_size
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic
from MiniGPTPancreasLib.summaries import describe_sweep
from MiniGPTPancreasLib.volume_geometry import add_volume_node, current_model_slice, numpy_to_matrix, slice_center_ras
from MiniGPTPancreasLib.volume_requests import RESAMPLE_CHECKBOX_TEXT
from SlicerMiniGPTPancreas.geometry import ModelView, ObliqueVolumeError, nearest_axial_grid


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real service around a tiny MiniGPT-v2 whose engine keeps every slice it was asked about."""
    pytest.importorskip("uvicorn")
    from backend.service import create_app
    from tiny_upstream_models import tiny_engine

    engine = tiny_engine(tmp_path_factory.mktemp("tiny_upstream"), "tiny-slicer-test", recording=True)
    with LiveServer(create_app(engine, constrain_boxes=True)) as server:
        server.engine = engine
        yield server


def test_a_tilted_volume_is_refused_unless_the_server_may_resample_it(live, scene):
    hu, matrix = tilted_ct()
    node = add_volume_node(scene, hu, matrix, "tilted CT")
    logic = MiniGPTPancreasLogic(poll_interval_s=0.02)
    logic.set_server(live.url, read_timeout=WAIT_S)
    refusal = rf"0\.50 degrees.*check '{RESAMPLE_CHECKBOX_TEXT}'.*resample_tilted"  # the panel's label, the option
    for refused in (logic.prepare_sweep, logic.sweep_geometry):  # Apply, and the panel's slice range
        with pytest.raises(ObliqueVolumeError, match=refusal):
            refused(node)

    logic.resample_tilted = True
    grid = ModelView.from_volume(np.zeros(hu.shape, np.int16), nearest_axial_grid(matrix, hu.shape))
    assert logic.sweep_geometry(node).shape == grid.shape  # the panel's range spans the resampled slices
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    slice_to_ras = np.eye(4)
    slice_to_ras[:3, 3] = slice_center_ras(grid, 12)
    red.GetSliceToRAS().DeepCopy(numpy_to_matrix(slice_to_ras))
    red.UpdateMatrices()
    assert current_model_slice(logic.sweep_geometry(node), red) == 12  # the panel's "Here" on the resampled grid
    request = logic.prepare_sweep(node, (8, 16))
    assert request.resampled
    outcome = logic.run_sweep(request, REFER)
    run = logic.add_sweep_boxes(request, outcome, REFER, scene, node)
    assert outcome.state == "done" and sorted(outcome.responses) == list(range(8, 17))
    status = describe_sweep(outcome.state, outcome.done, outcome.total, outcome.responses, outcome.message,
                            request.resampled)
    assert status.startswith("Boxes on ") and "resampled the tilted volume onto the nearest axial grid" in status
    assert run.rois and all(made.GetAttribute("MiniGPTPancreas.resampled") == "nearest axial grid"
                            for made in (*run.rois, scene.GetFirstNodeByName(f"{run.title} results")))
    np.testing.assert_allclose(logic.last_run.geometry.model_to_ras_matrix, grid.model_to_ras_matrix)
    seen = np.zeros((grid.shape[0],) + live.engine.seen[0].shape, np.int16)
    seen[8:17] = live.engine.seen[-9:]  # the resampled slices 8..16, in order
    assert_block_boxes_cover_the_block(seen, grid)
    rois = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsROINode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode"))]
    placed = [(s, box.box) for s, response in sorted(outcome.responses.items()) for box in response.boxes]
    assert placed and len(rois) >= len(placed)
    for roi, (s, box) in zip(rois, placed):
        center, size = roi_world_center_and_size(roi)
        want_center, want_size = grid.box_to_ras(box, s)
        np.testing.assert_allclose(center, want_center, atol=1e-6)
        np.testing.assert_allclose(size, want_size, atol=1e-6)
