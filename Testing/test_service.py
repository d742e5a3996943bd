"""The HTTP service, served by a real uvicorn on 127.0.0.1 around a real (tiny) MiniGPT-v2, driven by the client.

Expectations are computed independently: answers by calling the same engine directly (greedy decoding is
deterministic), boxes by parsing the answer text with the grammar and decoding it on the SENT slice's size.
A `Gate` in front of the engine (gated_engine.py) holds the engine thread where a test needs work to stay queued.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
import requests

from backend import cli
from backend.engine import InferenceEngine
from backend.service import ServiceLimits, create_app
from backend.service.volumes import VolumeStore
from gated_engine import WAIT_S, Gate, GatedEngine
from live_server import LiveServer
from model_folders import bundled_model_copy
from SlicerMiniGPTPancreas import client as c
from SlicerMiniGPTPancreas import grammar
from SlicerMiniGPTPancreas import protocol as p
from tiny_upstream_models import build_tiny_upstream, tiny_engine

REFER = "[refer] give me the location of the pancreas"
YES_NO = "[vqa] Based on the image, respond to this question with a short answer: does the pancreas contain a tumor?"
TOKEN = "service-test-token-0123456789"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> InferenceEngine:
    return tiny_engine(tmp_path_factory.mktemp("tiny_upstream"))


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def live(engine, gate) -> Iterator[LiveServer]:
    """The loopback server without a token that most tests share."""
    app = create_app(GatedEngine(engine, gate), constrain_boxes=True,
                     limits=ServiceLimits(max_upload_bytes=200_000))
    with LiveServer(app) as server:
        yield server


@pytest.fixture()
def api(live, gate) -> Iterator[c.MiniGPTPancreasClient]:
    with live.client() as client:
        yield client
    gate.open()  # whatever a test did, never leave the shared engine thread held
    _wait_until(lambda: not live.service.worker.busy, "the engine thread did not become idle")


@contextmanager
def server_with(engine: InferenceEngine, **options) -> Iterator[LiveServer]:
    with LiveServer(create_app(engine, **options)) as server:
        yield server


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _slice(seed: int, shape: tuple[int, int] = (32, 40)) -> np.ndarray:
    """An int16 HU slice [R, C]: soft tissue with a brighter blob, so the window has contrast."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    blob = ((rows - shape[0] / 2) ** 2 + (cols - shape[1] / 3) ** 2) < (min(shape) / 4) ** 2
    return (rng.normal(40, 30, shape) + 120 * blob).round().astype(np.int16)


def _volume(slices: int, seed: int = 0) -> np.ndarray:
    return np.stack([_slice(seed + s) for s in range(slices)])  # [S, R, C]


def _error_body(response: requests.Response) -> p.ErrorResponse:
    return p.ErrorResponse.from_dict(response.json())


# --- health, info, queries, chat ----------------------------------------------------------------------------------

def test_health_and_info_describe_the_loaded_model(api, engine):
    health = api.check_connection()  # loopback without a token: no token needed
    assert (health.status, health.api_version, health.model_id, health.device, health.busy) == \
           ("ok", p.API_VERSION, "tiny-test", "cpu", False)
    info = api.info()
    assert (info.model_id, info.device, info.precision, info.image_size) == ("tiny-test", "cpu", "float32", 56)
    assert info.max_upload_bytes == 200_000 and info.max_new_tokens_limit == p.MAX_NEW_TOKENS_LIMIT
    assert REFER in info.example_prompts
    tasks = {task.name: task for task in info.tasks}
    assert list(tasks) == ["pancreas_detection", "tumor_classification", "tumor_detection", "multi_organ"]
    assert tasks["pancreas_detection"].prompts == (REFER,) and tasks["tumor_classification"].kind == "yes_no"
    assert info.example_prompts == tuple(prompt for task in info.tasks for prompt in task.prompts)


def test_query_answers_like_the_engine_with_boxes_on_the_sent_slice(api, engine):
    slice_hu = _slice(1, (32, 40))  # not square: a box in 56 x 56 model pixels would show
    response = api.query_slice(slice_hu, REFER, (0.8, 0.8), slice_index=7)

    expected = engine.run([slice_hu], REFER, constrain_boxes=True)[0]
    assert response.answer == expected.answer and response.kind == "boxes" == expected.kind
    assert (response.model_id, response.slice_index) == ("tiny-test", 7)
    parsed = grammar.parse_answer(response.answer)
    assert [b.box for b in response.boxes] == [grammar.grid_to_pixels(g, 40, 32) for g in parsed.grid_boxes]
    for box in response.boxes:
        x_min, y_min, x_max, y_max = box.box
        assert 0 <= x_min <= x_max <= 39 and 0 <= y_min <= y_max <= 31
        assert 0 < box.confidence <= 1
    assert response.inference_ms > 0 and response.queue_ms >= 0


def test_query_options_choose_box_decoding_and_yes_no_reads_a_probability(api, engine):
    slice_hu = _slice(2, (30, 50))
    floor = api.query_slice(slice_hu, REFER, (1.0, 1.0), options=p.AnswerOptions(box_decoding="floor"))
    grid_boxes = grammar.parse_answer(floor.answer).grid_boxes
    assert [b.box for b in floor.boxes] == [grammar.grid_to_pixels(g, 50, 30, mode="floor") for g in grid_boxes]

    answer = api.query_slice(slice_hu, YES_NO, (1.0, 1.0), options=p.AnswerOptions(max_new_tokens=5))
    expected = engine.run([slice_hu], YES_NO, max_new_tokens=5)[0]
    assert answer.answer == expected.answer
    assert answer.yes_probability == pytest.approx(expected.yes_probability)
    assert 0 <= answer.yes_probability <= 1


def test_answer_options_go_with_the_call_to_the_one_engine(api, engine):
    # No sibling engine per option combination: one image cache serves every decoding and intensity rule.
    slice_hu = _slice(21, (30, 50))
    encoded = engine.images_encoded
    center = api.query_slice(slice_hu, REFER, (1.0, 1.0))
    floor = api.query_slice(slice_hu, REFER, (1.0, 1.0), options=p.AnswerOptions(box_decoding="floor"))
    assert engine.images_encoded == encoded + 1  # the second question reused the first one's image embedding
    assert floor.answer == center.answer
    expected = engine.run([slice_hu], REFER, constrain_boxes=True, box_decoding="floor")[0]
    assert [b.box for b in floor.boxes] == [tuple(float(v) for v in d.box) for d in expected.boxes]
    paper = api.query_slice(slice_hu, REFER, (1.0, 1.0), options=p.AnswerOptions(image_variant="paper"))
    assert engine.images_encoded == encoded + 2  # another intensity rule is another image
    assert paper.answer == engine.run([slice_hu], REFER, constrain_boxes=True, image_variant="paper")[0].answer


def test_chat_answers_the_last_user_turn_like_the_engine(api, engine):
    slice_hu = _slice(3)
    messages = [p.ChatMessage("user", "what organ is this?"), p.ChatMessage("assistant", "the pancreas"),
                p.ChatMessage("user", REFER)]
    reply = api.chat(messages, slice_hu, (0.7, 0.7), options=p.AnswerOptions(max_new_tokens=12))
    expected = engine.chat(slice_hu, ["what organ is this?", REFER], max_new_tokens=12)
    assert (reply.answer, reply.model_id) == (expected.answer, "tiny-test")
    assert [b.box for b in reply.boxes] == [d.box for d in expected.boxes]


# --- volumes and sweeps -------------------------------------------------------------------------------------------

def test_sweep_answers_every_requested_slice(api, engine):
    volume = _volume(6)
    uploaded = api.upload_volume(volume, (0.8, 0.8, 2.5))
    assert uploaded.shape == (6, 32, 40) and uploaded.spacing_mm == (0.8, 0.8, 2.5)

    job = api.start_sweep(uploaded.volume_id, REFER, slice_start=1, step=2)  # slices 1, 3, 5
    assert job.total == 3 and job.state in ("queued", "running", "done")
    _wait_until(lambda: api.sweep_status(job.job_id).finished, "the sweep did not finish")
    status = api.sweep_status(job.job_id)
    assert (status.state, status.done, status.total, status.volume_id) == ("done", 3, 3, uploaded.volume_id)
    assert [r.slice_index for r in status.results] == [1, 3, 5]
    expected = engine.run([volume[1], volume[3], volume[5]], REFER, constrain_boxes=True)
    assert [r.answer for r in status.results] == [e.answer for e in expected]
    assert [[b.box for b in r.boxes] for r in status.results] == [[d.box for d in e.boxes] for e in expected]


def test_cancel_stops_a_running_sweep_at_once(api, live, gate):
    uploaded = api.upload_volume(_volume(12), (1.0, 1.0, 1.0))
    gate.close()
    job = api.start_sweep(uploaded.volume_id, REFER)  # 3 batches of 4
    gate.wait_until_held()  # the first batch is about to run
    cancelled = api.cancel_sweep(job.job_id)
    assert (cancelled.state, cancelled.done, cancelled.total) == ("cancelled", 0, 12)
    gate.let_through(1)  # the batch in flight finishes; its answers are dropped and no further batch starts
    _wait_until(lambda: not live.service.worker.busy, "the cancelled sweep kept the engine busy")
    later = api.sweep_status(job.job_id)
    assert (later.state, later.done, later.results) == ("cancelled", 0, ())
    assert "cancelled" in later.message


def test_a_slice_query_overtakes_the_remaining_batches_of_a_sweep(api, live, gate):
    uploaded = api.upload_volume(_volume(8), (1.0, 1.0, 1.0))
    gate.close()
    job = api.start_sweep(uploaded.volume_id, REFER)  # 2 batches of 4
    gate.wait_until_held()
    with ThreadPoolExecutor(1) as pool, live.client() as other:
        query = pool.submit(other.query_slice, _slice(5), REFER, (1.0, 1.0))
        _wait_until(lambda: live.service.worker.queued == 1, "the query was not queued")
        gate.let_through(2)  # sweep batch 1, then the query; sweep batch 2 waits at the gate
        assert query.result(WAIT_S).kind == "boxes"
        status = api.sweep_status(job.job_id)
        assert (status.state, status.done) == ("running", 4)
    gate.open()
    _wait_until(lambda: api.sweep_status(job.job_id).finished, "the sweep did not finish")
    assert api.sweep_status(job.job_id).done == 8


def test_sweep_requests_outside_the_volume_or_for_unknown_ids_are_refused(api):
    uploaded = api.upload_volume(_volume(3), (1.0, 1.0, 1.0))
    with pytest.raises(c.RequestRejectedError, match="3 slices") as error:
        api.start_sweep(uploaded.volume_id, REFER, slice_start=2, slice_stop=5)
    assert error.value.status == 422
    with pytest.raises(c.RequestRejectedError, match="<ImageHere>"):  # refused before it is queued
        api.start_sweep(uploaded.volume_id, "where is <ImageHere> the pancreas?")
    with pytest.raises(c.ResourceNotFoundError, match="no volume 'no-such-volume'"):
        api.start_sweep("no-such-volume", REFER)
    for call in (api.sweep_status, api.cancel_sweep):
        with pytest.raises(c.ResourceNotFoundError, match="no sweep job 'no-such-job'") as error:
            call("no-such-job")
        assert error.value.status == 404


def test_oversized_upload_is_refused_with_413(api):
    too_big = np.zeros((5, 100, 250), np.int16)  # 250 000 bytes; the server takes 200 000
    with pytest.raises(c.PayloadTooLargeError, match="limit of 200000 bytes") as error:
        api.upload_volume(too_big, (1.0, 1.0, 1.0))
    assert error.value.status == 413
    assert api.health().status == "ok"  # the connection reset did not hurt the server


def test_volume_store_evicts_least_recently_used_and_expires_idle_volumes():
    now = [0.0]
    store = VolumeStore(capacity_bytes=3000, ttl_s=60, clock=lambda: now[0])
    first, second = (store.add(np.zeros((1, 10, 50), np.int16), (1.0, 1.0, 1.0)) for _ in range(2))  # 1000 B each
    store.get(first.volume_id)  # now the most recently used
    store.add(np.zeros((1, 10, 60), np.int16), (1.0, 1.0, 1.0))  # 1200 B: evicts `second`
    with pytest.raises(Exception, match="no volume"):
        store.get(second.volume_id)
    now[0] = 61.0
    with pytest.raises(Exception, match="expired after 60 s unused"):
        store.get(first.volume_id)


# --- bad requests -------------------------------------------------------------------------------------------------

def test_malformed_and_incomplete_bodies_get_422_with_the_error_body(live):
    url = live.url + p.ROUTE_QUERY
    json_header = {"Content-Type": "application/json"}
    broken = requests.post(url, data=b"{not json", headers=json_header, timeout=WAIT_S)
    assert broken.status_code == 422 and _error_body(broken).code is p.ErrorCode.VALIDATION
    assert "not valid JSON" in _error_body(broken).message

    missing = requests.post(url, json={"prompt": REFER, "pixel_spacing_mm": [1, 1]}, timeout=WAIT_S)
    assert missing.status_code == 422
    assert _error_body(missing).message == "SliceQueryRequest.slice_hu: required field is missing"

    request = p.SliceQueryRequest(REFER, _slice(0), (1.0, 1.0)).to_dict()
    request["slice_hu"]["shape"] = [33, 40]  # the data no longer matches the shape
    mismatch = requests.post(url, json=request, timeout=WAIT_S)
    assert mismatch.status_code == 422 and "slice_hu.data" in _error_body(mismatch).message

    form = requests.post(url, data={"prompt": REFER}, timeout=WAIT_S)
    assert form.status_code == 415 and _error_body(form).code is p.ErrorCode.UNSUPPORTED_MEDIA


def test_requests_the_engine_cannot_answer_are_refused_with_422(api):
    with pytest.raises(c.RequestRejectedError, match="temperature 0") as error:
        api.query_slice(_slice(0), REFER, (1.0, 1.0), options=p.AnswerOptions(temperature=0.7))
    assert error.value.status == 422
    with pytest.raises(c.RequestRejectedError, match="<ImageHere>") as error:  # the engine's own check
        api.query_slice(_slice(0), "where is <ImageHere> the pancreas?", (1.0, 1.0))
    assert error.value.status == 422


def test_api_major_version_mismatch_is_409_and_health_stays_readable(live):
    newer = {p.API_VERSION_HEADER: "2.0"}
    refused = requests.get(live.url + p.ROUTE_INFO, headers=newer, timeout=WAIT_S)
    assert refused.status_code == 409 and _error_body(refused).code is p.ErrorCode.VERSION_MISMATCH
    assert "client speaks API 2.0" in _error_body(refused).message
    minor = requests.get(live.url + p.ROUTE_INFO, headers={p.API_VERSION_HEADER: "1.9"}, timeout=WAIT_S)
    assert minor.status_code == 200
    health = requests.get(live.url + p.ROUTE_HEALTH, headers=newer, timeout=WAIT_S)
    assert health.status_code == 200 and health.json()["api_version"] == p.API_VERSION


def test_unknown_route_is_not_mistaken_for_an_unknown_job(live):
    response = requests.get(live.url + p.API_PREFIX + "/nothing-here", timeout=WAIT_S)
    assert response.status_code == 404 and _error_body(response).code is not p.ErrorCode.NOT_FOUND
    wrong_method = requests.put(live.url + p.ROUTE_QUERY, timeout=WAIT_S)
    assert wrong_method.status_code == 405 and "not allowed" in _error_body(wrong_method).message


# --- access and load ----------------------------------------------------------------------------------------------

def test_a_token_is_required_and_checked(engine):
    with server_with(engine, token=TOKEN) as server:
        for token, expected in ((None, "requires an access token"), ("wrong-token-of-enough-length", "rejected")):
            with server.client(token) as client, pytest.raises(c.AuthenticationError, match=expected) as error:
                client.health()
            assert error.value.status == 401
        raw = requests.get(server.url + p.ROUTE_INFO, headers={"Authorization": "Bearer nope"}, timeout=WAIT_S)
        assert raw.status_code == 401 and raw.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in raw.text
        with server.client(TOKEN) as client:
            assert client.check_connection().status == "ok"
            assert client.query_slice(_slice(0), REFER, (1.0, 1.0)).model_id == "tiny-test"


def test_a_full_queue_answers_503_with_retry_after(engine):
    gate = Gate()
    gate.close()
    with server_with(GatedEngine(engine, gate), limits=ServiceLimits(max_queue=1, max_sweeps=1)) as server, \
            ThreadPoolExecutor(2) as pool:
        clients = [server.client() for _ in range(3)]
        running = pool.submit(clients[0].query_slice, _slice(0), REFER, (1.0, 1.0))
        gate.wait_until_held()  # the first query holds the engine
        waiting = pool.submit(clients[1].query_slice, _slice(1), REFER, (1.0, 1.0))
        _wait_until(lambda: server.service.worker.queued == 1, "the second query was not queued")
        with pytest.raises(c.ServerBusyError, match="busy") as error:
            clients[2].query_slice(_slice(2), REFER, (1.0, 1.0))
        assert error.value.status == 503 and error.value.retry_after_s >= 1

        volume_id = clients[2].upload_volume(_volume(2), (1.0, 1.0, 1.0)).volume_id
        sweep = clients[2].start_sweep(volume_id, REFER)  # waits behind the queries
        with pytest.raises(c.ServerBusyError, match=r"limit of 1 sweep\(s\) running or waiting"):
            clients[2].start_sweep(volume_id, REFER)
        gate.open()
        assert running.result(WAIT_S).model_id == waiting.result(WAIT_S).model_id == "tiny-test"
        _wait_until(lambda: clients[2].sweep_status(sweep.job_id).state == "done", "the sweep did not finish")
        for client in clients:
            client.close()


def test_shutdown_cancels_running_sweeps(engine):
    gate = Gate()
    gate.close()
    with server_with(GatedEngine(engine, gate)) as server, server.client() as client:
        uploaded = client.upload_volume(_volume(8), (1.0, 1.0, 1.0))
        job_id = client.start_sweep(uploaded.volume_id, REFER).job_id
        gate.wait_until_held()
        job = server.service.jobs.get(job_id)
        threading.Timer(0.5, gate.open).start()  # the batch in flight ends while the server stops
    assert job.status().state == "cancelled" and "shut down" in job.status().message
    assert not server.service.worker.busy


def test_health_says_loading_then_why_the_model_failed_to_load_and_every_call_says_so(tmp_path, caplog):
    release = threading.Event()
    folder = bundled_model_copy(tmp_path / "model")
    (folder / "trainable.safetensors").write_bytes(b"\0" * 64)  # found only while loading: the sha256 differs
    why = f"{folder / 'trainable.safetensors'} is missing or not the file minigpt_model.json was written with"

    def load_engine() -> InferenceEngine:
        release.wait(WAIT_S)
        return InferenceEngine.from_model_dir(folder)

    with LiveServer(create_app(load_engine=load_engine, device_hint="cuda")) as server, server.client() as client, \
            caplog.at_level(logging.INFO):
        health = client.check_connection()  # loading is not an error
        assert (health.status, health.model_id, health.device, health.message) == ("loading", "", "cuda", None)
        with pytest.raises(c.ServerBusyError, match="still loading") as busy:
            client.query_slice(_slice(0), REFER, (1.0, 1.0))
        assert busy.value.retry_after_s == 10
        release.set()
        _wait_until(lambda: client.health().status == "error", "the failed load was not reported")
        assert why in client.health().message and "re-create it" in client.health().message
        with pytest.raises(c.ServerError, match="model failed to load: " + re.escape(why)):
            client.check_connection()
        for call in (client.info, lambda: client.query_slice(_slice(0), REFER, (1.0, 1.0))):
            with pytest.raises(c.ServerError, match=re.escape(why) + ".*re-create it; then restart the server") \
                    as failed:
                call()
            assert failed.value.status == 503 and not isinstance(failed.value, c.ServerBusyError)
        reply = requests.get(server.url + p.ROUTE_INFO, timeout=WAIT_S)
        assert p.ErrorResponse.from_dict(reply.json()).code is p.ErrorCode.MODEL_UNAVAILABLE
        assert "Retry-After" not in reply.headers  # waiting will not help
    failures = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [(record.getMessage(), record.exc_info) for record in failures] == \
           [(f"the model failed to load: {why} (sha256 differs). The model folder is damaged; re-create it.", None)]


# --- the serve command --------------------------------------------------------------------------------------------

def test_serve_refuses_a_public_host_without_a_token(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MINIGPT_PANCREAS_TOKEN", raising=False)
    assert cli.main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "needs an access token" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0", "--token", "short"]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_serve_reports_a_taken_port_and_a_bad_model_path(engine, capsys, tmp_path, tmp_path_factory):
    assert cli.main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    files = build_tiny_upstream(tmp_path_factory.mktemp("serve_upstream"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--upstream", str(files.vit_checkpoint), str(files.llama_dir),
                str(files.minigpt_checkpoint), "--image-size", "56", "--device", "cpu", "--port", str(port)]
        assert cli.main(argv) == 2
    assert f"port {port} is in use: is another server running? use --port" in capsys.readouterr().err
