"""The Slicer module's logic against a REAL server (uvicorn around a tiny MiniGPT-v2 of the real code) on REAL MRML
nodes (the slicer-core wheel), its background worker, and checks of the module's files (CMake lists, .ui names,
icon, prompt copies).

Expectations are computed independently of the module: ROI positions from SlicerMiniGPTPancreas.geometry.ModelView,
the slices the server saw recorded inside its engine.
"""

from __future__ import annotations

import ast
import re
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from live_server import LiveServer
# slicer_fixtures before the Lib: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import (MODULE_DIR, REFER, ROOT, ROTATE_90_AND_SHIFT, WAIT_S, Gate, add_ct,
                             expected_view, new_scene, noise_free_phantom, truth_slices)

from MiniGPTPancreasLib import boxes_to_markups, prompts
from MiniGPTPancreasLib.boxes_to_markups import roi_world_center_and_size
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic, SweepOutcome
from MiniGPTPancreasLib.summaries import describe_response, describe_sweep
from MiniGPTPancreasLib.worker import FAILED, FINISHED, PROGRESS, BackgroundTask
from SlicerMiniGPTPancreas.geometry import GeometryError
from SlicerMiniGPTPancreas.phantom import reorient


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture(scope="module")
def phantom():
    return noise_free_phantom()


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
