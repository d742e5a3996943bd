"""The module starts, reuses and stops a REAL `minigpt-pancreas serve` (the bundled demo model, on a free loopback
port) through its Logic, reads the questions from the server's /api/v1/info, and chats about a slice of a phantom
with the boxes of the answer drawn as ROIs (REAL MRML nodes from the slicer-core wheel). In Slicer the same Logic
starts the process with slicer.util.launchConsoleProcess instead of subprocess.Popen."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

# slicer_fixtures before the Lib: it skips without slicer-core and puts MiniGPTPancreasModule/ on sys.path.
from slicer_fixtures import (REFER, ROOT, WAIT_S, add_ct, expected_view, new_scene, noise_free_phantom,
                             truth_slices)

from MiniGPTPancreasLib import local_server
from MiniGPTPancreasLib.boxes_to_markups import roi_world_center_and_size
from MiniGPTPancreasLib.logic import MiniGPTPancreasLogic
from MiniGPTPancreasLib.prompts import menu_entries, presets_from_info
from MiniGPTPancreasLib.summaries import describe_info
from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.client import ClientError

START_S = 240.0  # importing torch and loading the demo model on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logic_at(url: str) -> MiniGPTPancreasLogic:
    logic = MiniGPTPancreasLogic(poll_interval_s=0.05)
    logic.set_server(url, read_timeout=WAIT_S * 3)
    return logic


@pytest.fixture(scope="module")
def demo_server():
    """A logic that started `minigpt-pancreas serve` (the checkout's .venv or the running Python's scripts)."""
    pytest.importorskip("torch")
    logic = logic_at(f"http://127.0.0.1:{free_port()}")
    if not Path(logic.local_server.executable).is_file():  # no .venv in this checkout: the test environment's CLI
        logic.local_server.executable = str(Path(sys.executable).parent / "minigpt-pancreas")
    state, info = logic.start_local_server(timeout_s=START_S)
    yield logic, state, info
    logic.stop_local_server()


def test_start_runs_serve_with_the_demo_model_and_reports_which_model_answers(demo_server):
    logic, state, info = demo_server
    assert state == local_server.STARTED and logic.local_server.running
    command = logic.local_server.command
    assert command[1:4] == ["serve", "--model", str(ROOT / "backend" / "demo_model" / "model")]
    assert command[-4:] == ["--host", "127.0.0.1", "--port", logic.client.base_url.rsplit(":", 1)[1]]
    assert info.synthetic and info.model_id.startswith("minigpt-pancreas-demo")
    assert "synthetic CT only: not for patients" in describe_info(info, logic.client.base_url)
    assert any("ready" in line for line in logic.local_server.log_lines())  # the child's log reaches the panel


def test_a_second_start_reuses_the_server_already_answering(demo_server):
    logic, _, _ = demo_server
    other = logic_at(logic.client.base_url)
    state, info = other.start_local_server(timeout_s=WAIT_S)
    assert state == local_server.REUSED and other.local_server.process is None
    assert other.stop_local_server() is None and logic.check_server().status == "ok"  # not ours: left running


def test_the_questions_offered_are_the_prompts_of_the_servers_tasks_grouped_by_task(demo_server):
    logic, _, info = demo_server
    assert [task.name for task in info.tasks] == ["pancreas_detection", "tumor_classification", "tumor_detection",
                                                  "multi_organ"]
    entries = [None if preset is None else (preset.task, preset.title) for preset in menu_entries(logic.presets)]
    assert entries == [
        ("Pancreas detection", "Pancreas: where is it? (box)"), None,
        ("Pancreatic tumour yes/no", "Does the pancreas contain a tumor? (yes/no)"), None,
        ("Pancreatic tumour detection", "Pancreatic tumor: where is it? (box)"), None,
        ("Liver, kidney and spleen detection", "Liver: where is it? (box)"),
        ("Liver, kidney and spleen detection", "Kidney: where is it? (box)"),
        ("Liver, kidney and spleen detection", "Spleen: where is it? (box)")]
    assert [preset.prompt for preset in logic.presets] == list(info.example_prompts)  # what older clients offer
    assert "tasks: Pancreas detection; Pancreatic tumour yes/no; " in describe_info(info, logic.client.base_url)


def test_a_server_without_tasks_offers_its_example_prompts_and_a_task_list_filters_them():
    older = p.ModelInfo("m", "1.1", "0.1", "cpu", "float32", 448, 1024, 1 << 20, (REFER, "[vqa] what is this?"))
    assert [(preset.prompt, preset.task) for preset in presets_from_info(older)] == [
        (REFER, ""), ("[vqa] what is this?", "")]
    assert None not in menu_entries(presets_from_info(older))
    newer = dataclasses.replace(older, tasks=(p.TaskInfo("pancreas_detection", "Pancreas detection", "boxes",
                                                         (REFER,)),))
    assert [(preset.prompt, preset.task) for preset in presets_from_info(newer)] == [(REFER, "Pancreas detection")]


def test_chat_about_a_slice_keeps_the_turns_and_draws_the_boxes_of_the_answer(demo_server):
    logic, _, _ = demo_server
    scene, phantom = new_scene(), noise_free_phantom()
    node = add_ct(scene, phantom)
    truths = truth_slices(phantom.labels, phantom.ijk_to_ras, [1, 2])
    s = sorted(truths)[len(truths) // 2]
    request = logic.prepare_slice(node, s)
    sent = logic.chat_session.ask(node.GetID(), s, logic.presets[0].prompt)
    reply = logic.chat(request, sent)
    run = logic.add_chat_boxes(request, sent, reply, scene, node)
    assert reply.boxes, f"the demo model answered {reply.answer!r} without a box"
    view = expected_view(phantom)
    assert [roi.GetName() for roi in run.rois] == [f"pancreas s{s} ({box.confidence:.2f})" for box in reply.boxes]
    np.testing.assert_allclose(roi_world_center_and_size(run.rois[0])[0], view.box_to_ras(reply.boxes[0].box, s)[0],
                               atol=1e-6)
    follow_up = logic.chat_session.ask(node.GetID(), s, "[refer] give me the location of the pancreatic tumor")
    assert [m.role for m in follow_up] == ["user", "assistant", "user"] and follow_up[1].text == reply.answer
    assert len(logic.chat_session.ask(node.GetID(), s + 1, "and here?")) == 1  # another slice: a new conversation


def test_stop_ends_the_child_and_its_port_stops_answering(demo_server):
    logic, _, _ = demo_server
    process = logic.local_server.process
    assert logic.stop_local_server() is not None and process.poll() is not None
    assert not logic.local_server.running
    with pytest.raises(ClientError):
        logic.check_server()


def test_a_model_that_fails_to_load_is_reported_at_once_with_the_reason(tmp_path):
    from model_folders import bundled_model_copy

    broken = bundled_model_copy(tmp_path / "model")
    (broken / "trainable.safetensors").write_bytes(b"\0" * 64)  # found only while loading: the sha256 differs
    logic = logic_at(f"http://127.0.0.1:{free_port()}")
    logic.local_server.model_dir = str(broken)
    if not Path(logic.local_server.executable).is_file():
        logic.local_server.executable = str(Path(sys.executable).parent / "minigpt-pancreas")
    started = time.monotonic()
    try:
        with pytest.raises(local_server.LocalServerError, match="model failed to load.*sha256 differs"):
            logic.start_local_server(timeout_s=START_S)
    finally:
        logic.stop_local_server()
    assert time.monotonic() - started < START_S / 2  # said when the server knew, not when the wait ran out


def test_a_missing_executable_is_reported_with_the_full_command(tmp_path):
    logic = logic_at(f"http://127.0.0.1:{free_port()}")
    logic.local_server.executable = str(tmp_path / "bin" / "minigpt-pancreas")
    with pytest.raises(local_server.LocalServerError) as error:
        logic.start_local_server(timeout_s=WAIT_S)
    message = str(error.value)
    assert "does not exist" in message and f"{tmp_path}/bin/minigpt-pancreas serve --model " in message
    assert logic.local_server.process is None


def test_the_log_keeps_output_the_launchers_codec_cannot_decode():
    """Slicer's launcher decodes the pipe with the locale's codec; the model loading prints progress bars."""
    script = "print('Loading weights: \\u2588\\u2588 100%'); print('ready')"

    def launch(args):
        return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="ascii", env={**os.environ, "PYTHONIOENCODING": "utf-8"})

    server = local_server.LocalServer(sys.executable, "", launch)
    server.start(logic_at(f"http://127.0.0.1:{free_port()}").client)
    server.process.wait(WAIT_S)
    lines = []
    deadline = time.monotonic() + WAIT_S
    while len(lines) < 2 and time.monotonic() < deadline:
        lines += server.log_lines()
        time.sleep(0.01)
    assert lines == ["Loading weights: \u2588\u2588 100%", "ready"]


def test_a_remote_url_is_not_started_locally():
    logic = logic_at(f"http://192.0.2.1:{free_port()}")  # TEST-NET-1: nothing answers there
    logic.set_server(logic.client.base_url, connect_timeout=0.2)
    with pytest.raises(local_server.LocalServerError, match="not on this computer"):
        logic.start_local_server(timeout_s=WAIT_S)
