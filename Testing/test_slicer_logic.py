"""The Slicer module's logic against a REAL server (uvicorn around a tiny MiniGPT-v2 of the real code) on REAL MRML
nodes (the slicer-core wheel), its background worker and task runner, prompt titles and box labels.

Expectations are computed independently of the module: ROI positions from SlicerMiniGPTPancreas.geometry.ModelView,
the slices the server saw recorded inside its engine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gated_engine import GatedEngine
from live_server import LiveServer
# slicer_fixtures before the Lib: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import (REFER, ROTATE_90_AND_SHIFT, TUMOUR, WAIT_S, Gate, add_ct,
                             expected_view, truth_slices)

from MiniGPTPancreasLib import boxes_to_markups, prompts
from MiniGPTPancreasLib.boxes_to_markups import roi_world_center_and_size
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic, SweepOutcome
from MiniGPTPancreasLib.summaries import describe_response, describe_sweep
from MiniGPTPancreasLib.worker import FAILED, FINISHED, PROGRESS, BackgroundTask, TaskRunner
from SlicerMiniGPTPancreas.geometry import GeometryError
from SlicerMiniGPTPancreas.phantom import reorient


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

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real service (backend.service.create_app) around a tiny MiniGPT-v2 whose engine records what it saw."""
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    from backend.service import create_app
    from tiny_upstream_models import tiny_engine

    engine = tiny_engine(tmp_path_factory.mktemp("tiny_upstream"), "tiny-slicer-test", recording=True)
    gate = Gate()
    with LiveServer(create_app(GatedEngine(engine, gate), constrain_boxes=True)) as server:
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


def test_apply_with_unchanged_settings_asks_over_the_same_connection(logic, live, scene, phantom):
    """The panel calls set_server on every Apply: a question must not pay for a new connection each time."""
    request = logic.prepare_slice(add_ct(scene, phantom), 20)

    def peers():
        return {connection.client for connection in set(live.server.server_state.connections)}

    def new_peers_after_asking():
        before = peers()
        logic.query_slice(request, REFER)
        return peers() - before

    assert len(new_peers_after_asking()) == 1  # the first question opens a connection
    logic.set_server(live.url + "/", read_timeout=WAIT_S)  # the same server, written as a user may type it
    assert new_peers_after_asking() == set()
    logic.set_server(live.url, read_timeout=WAIT_S / 2)  # other settings: another client
    assert len(new_peers_after_asking()) == 1


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
    again = logic.sweep_volume(node, TUMOUR, (first, last))
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


def test_a_cancelled_single_question_frees_the_panel_at_once_and_its_late_answer_is_dropped(logic, live, scene,
                                                                                           phantom):
    node = add_ct(scene, phantom)
    request = logic.prepare_slice(node, 20)
    answered = []
    runner = TaskRunner()
    live.gate.close()  # the engine thread will hold the question
    try:
        task = runner.start(lambda report, cancelled: logic.query_slice(request, REFER), answered.append,
                            drop_when_cancelled=True)
        assert live.gate.holding.wait(WAIT_S)
        assert runner.cancel() and not runner.busy  # free before the server has answered
    finally:
        live.gate.open()
    assert task.wait(WAIT_S)  # the late answer arrives...
    runner.poll()
    assert answered == []  # ...and is dropped: nothing handed over, nothing drawn
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 0
    runner.start(lambda report, cancelled: logic.query_slice(request, REFER), answered.append)
    while runner.busy:
        time.sleep(0.01)
        runner.poll()
    assert [response.slice_index for response in answered] == [20]


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



@pytest.mark.parametrize("prompt, title", [
    (REFER, "Pancreas: where is it? (box)"),
    ("[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?",
     "Does the pancreas contain a tumor? (yes/no)"),
    ("[vqa] what organ is this?", "What organ is this?"),
])
def test_menu_titles_are_read_from_the_prompt(prompt, title):
    assert prompts.preset_title(prompt) == title


@pytest.mark.parametrize("prompt, label", [
    (TUMOUR, "pancreatic tumor"),
    ("[refer] where is the gallbladder ?", "gallbladder"),
    ("[refer] give me the position of the left kidney", "left kidney"),
    ("[vqa] what organ is this?", "box"),
])
def test_box_labels_follow_the_prompt(prompt, label):
    assert prompts.box_label_for_prompt(prompt) == label
