"""The service under hostile input and load (issue 8), against a real uvicorn on 127.0.0.1 around the tiny model of
test_service.py: every client mistake gets a 4xx naming the field with a bounded message, the token is checked
first, limits are checked before a body is read, abandoned and cancelled work frees its place at once, idle
connections are closed, and a client leaving mid-request is one INFO log line.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from backend.service import ServiceLimits, create_app
from gated_engine import WAIT_S, Gate, GatedEngine
from live_server import LiveServer
from SlicerMiniGPTPancreas import client as c
from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.wire_arrays import encode_volume
from test_service import REFER, TOKEN, _slice, _volume, _wait_until, engine  # noqa: F401 (fixture)

JSON = {"Content-Type": "application/json"}
MAX_MESSAGE_CHARS = 1000


def _query(**changes) -> bytes:
    return json.dumps({**p.SliceQueryRequest(REFER, _slice(0), (1.0, 1.0)).to_dict(), **changes}).encode()


def _chat(**changes) -> bytes:
    request = p.ChatRequest((p.ChatMessage("user", "where is the pancreas?"),), _slice(0), (1.0, 1.0)).to_dict()
    return json.dumps({**request, **changes}).encode()


def _with_field(body: bytes, name: str, raw_value: bytes) -> bytes:
    return body[:-1] + b', "' + name.encode() + b'": ' + raw_value + b"}"


# (name, method, path, headers, body, words the message must hold: the field it names)
HOSTILE = {case[0]: case for case in [
    ("deep JSON", "POST", p.ROUTE_QUERY, JSON, b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("deep JSON in a field", "POST", p.ROUTE_QUERY, JSON,
     _with_field(_query(), "slice_index", b"[" * 5000 + b"]" * 5000), "nested too deeply"),
    ("integer beyond the digit limit", "POST", p.ROUTE_QUERY, JSON,
     _with_field(_query(), "slice_index", b"1" + b"0" * 5000), "digits"),
    ("long integer", "POST", p.ROUTE_QUERY, JSON, _with_field(_query(), "slice_index", b"1" + b"0" * 4000),
     "SliceQueryRequest.slice_index"),
    ("integer beyond the float range", "POST", p.ROUTE_QUERY, JSON, _query(pixel_spacing_mm=[10 ** 400, 1]),
     "SliceQueryRequest.pixel_spacing_mm[0]"),
    ("enormous API version", "GET", p.ROUTE_INFO, {p.API_VERSION_HEADER: "1" * 5000 + ".0"}, b"",
     p.API_VERSION_HEADER),
    ("lone surrogate in a prompt", "POST", p.ROUTE_QUERY, JSON, _query(prompt="[refer] where is \ud800 the pancreas"),
     "SliceQueryRequest.prompt"),
    ("lone surrogate in a chat", "POST", p.ROUTE_CHAT, JSON,
     _chat(messages=[{"role": "user", "text": "where \udfff"}]), "ChatRequest.messages[0].text"),
    ("tiny positive temperature", "POST", p.ROUTE_CHAT, JSON, _chat(options={"temperature": 1e-300}),
     "AnswerOptions.temperature"),
    ("long job id", "GET", p.API_PREFIX + "/sweeps/" + "j" * 20_000, {}, b"", "no sweep job"),
    ("long unknown path", "GET", p.API_PREFIX + "/" + "x" * 20_000, {}, b"", "no endpoint"),
    ("long volume id", "POST", p.ROUTE_SWEEPS, JSON, json.dumps({"volume_id": "v" * 20_000, "prompt": REFER}).encode(),
     "SweepJobRequest.volume_id"),
    ("shape with an underscore", "POST", p.ROUTE_VOLUMES + "?dtype=int16&spacing_mm=1,1,1&shape=1_0,2,2",
     {"Content-Type": "application/octet-stream"}, b"\0" * 80, "shape"),
    ("chat with too many messages", "POST", p.ROUTE_CHAT, JSON,
     _chat(messages=[{"role": "user", "text": "hi"}] * 100_001), "more than the limit of 64"),
]}


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def live(engine, gate):  # noqa: F811
    with LiveServer(create_app(GatedEngine(engine, gate), limits=ServiceLimits(max_upload_bytes=200_000))) as server:
        yield server


@pytest.mark.parametrize("name", HOSTILE)  # by name: a failure report then never prints megabytes of input
def test_hostile_input_gets_a_4xx_naming_the_field_with_a_short_message(live, name):
    _, method, path, headers, body, words = HOSTILE[name]
    response = requests.request(method, live.url + path, headers=headers, data=body, timeout=WAIT_S)
    assert 400 <= response.status_code < 500, response.text[:300]
    message = p.ErrorResponse.from_dict(response.json()).message
    assert words in message and len(message) <= MAX_MESSAGE_CHARS
    assert "ErrorResponse" not in message  # about the input, not about the error envelope
    assert live.service.worker.state == "ok"


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    (p.ROUTE_VOLUMES + "?shape=1,1,1&dtype=int16&spacing_mm=1,1,1", b"a" * 16, 422,
     "body: has more than the 2 bytes the shape needs"),
    (p.ROUTE_SWEEPS, b" " * 100_000, 413, "more than this endpoint's limit of 65536 bytes"),
])
def test_a_chunked_body_that_overflows_in_its_last_chunk_is_refused_as_with_a_content_length(live, path, body,
                                                                                             status, words):
    content_type = "application/octet-stream" if path.startswith(p.ROUTE_VOLUMES) else "application/json"
    with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])), WAIT_S) as raw:
        raw.settimeout(WAIT_S)
        # One data chunk and the terminator in one write: the server has read the whole body when it overflows.
        raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        reply = http.client.HTTPResponse(raw)
        reply.begin()
        assert reply.status == status
        assert words in p.ErrorResponse.from_dict(json.loads(reply.read())).message


def test_the_token_is_checked_before_anything_else(engine):  # noqa: F811
    with LiveServer(create_app(engine, token=TOKEN, limits=ServiceLimits(max_upload_bytes=1000))) as server:
        attempts = [
            ("GET", p.ROUTE_INFO, {p.API_VERSION_HEADER: "2.0"}, b""),  # a newer client: 409 if it had the token
            ("GET", p.ROUTE_INFO, {p.API_VERSION_HEADER: "x" * 5000}, b""),  # a broken header: 400
            ("POST", p.ROUTE_QUERY, JSON, b"{not json"),  # 422
            ("POST", p.ROUTE_QUERY, {"Content-Type": "text/plain"}, b"hello"),  # 415
            ("POST", p.ROUTE_VOLUMES + "?shape=100,100,100&dtype=int16&spacing_mm=1,1,1",
             {"Content-Type": "application/octet-stream"}, b"\0" * 2000),  # 413
            ("GET", p.sweep_route("no-such-job"), {}, b""),  # 404
        ]
        for method, path, headers, body in attempts:
            response = requests.request(method, server.url + path, headers=headers, data=body, timeout=WAIT_S)
            assert response.status_code == 401, (path, response.text)
            assert p.ErrorResponse.from_dict(response.json()).code is p.ErrorCode.UNAUTHORIZED


def test_a_cancelled_sweep_frees_its_slot_at_once(engine):  # noqa: F811
    gate = Gate()
    gate.close()
    with LiveServer(create_app(GatedEngine(engine, gate), limits=ServiceLimits(max_sweeps=1))) as server, \
            server.client() as client:
        volume_id = client.upload_volume(_volume(8), (1.0, 1.0, 1.0)).volume_id
        first = client.start_sweep(volume_id, REFER)
        gate.wait_until_held()  # its first batch is about to run
        client.cancel_sweep(first.job_id)
        second = client.start_sweep(volume_id, REFER)  # while the cancelled batch is still on the engine
        assert second.state == "queued"
        gate.open()
        _wait_until(lambda: client.sweep_status(second.job_id).state == "done", "the second sweep did not finish")
        assert client.sweep_status(first.job_id).state == "cancelled"


def test_a_query_whose_client_left_is_not_run(engine):  # noqa: F811
    gate = Gate()
    gate.close()
    engine_calls = []

    def count_then_gate() -> None:
        engine_calls.append(1)
        gate()

    with LiveServer(create_app(GatedEngine(engine, count_then_gate))) as server, ThreadPoolExecutor(1) as pool, \
            server.client() as client:
        running = pool.submit(client.query_slice, _slice(0), REFER, (1.0, 1.0))
        gate.wait_until_held()
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), WAIT_S) as leaving:
            body = _query()
            leaving.sendall(f"POST {p.ROUTE_QUERY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_until(lambda: server.service.worker.queued == 1, "the second query was not queued")
        _wait_until(lambda: server.service.worker.queued == 0, "the abandoned query stayed in the queue")
        gate.open()
        assert running.result(WAIT_S).model_id == "tiny-test"
        _wait_until(lambda: not server.service.worker.busy, "the engine did not become idle")
        assert len(engine_calls) == 1  # only the query whose client waited


def test_a_full_queue_is_refused_before_the_body_is_read_with_a_retry_after_from_recent_calls(engine):  # noqa: F811
    gate = Gate()
    with LiveServer(create_app(GatedEngine(engine, gate), limits=ServiceLimits(max_queue=4))) as server, \
            ThreadPoolExecutor(5) as pool:
        clients = [server.client() for _ in range(5)]
        for _ in range(3):
            clients[0].query_slice(_slice(0), REFER, (1.0, 1.0))  # recent calls: well under a second each
        gate.close()
        waiting = [pool.submit(client.query_slice, _slice(0), REFER, (1.0, 1.0)) for client in clients]
        gate.wait_until_held()
        _wait_until(lambda: server.service.worker.queued == 4, "the queue did not fill")
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), WAIT_S) as raw:
            raw.settimeout(WAIT_S)
            raw.sendall(f"POST {p.ROUTE_QUERY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        "Content-Length: 40000000\r\n\r\n".encode())  # the 40 MB body is never sent
            head = raw.recv(65536).decode("latin-1")
        assert head.startswith("HTTP/1.1 503")
        retry_after = int(head.lower().split("retry-after:")[1].split()[0])
        assert retry_after <= 2  # 5 calls ahead at a fraction of a second each, not 5 guessed seconds
        with server.client() as late, pytest.raises(c.ServerBusyError):  # sending its body anyway, it hears why
            late.query_slice(_slice(0, (2048, 2048)), REFER, (1.0, 1.0))
        gate.open()
        assert all(future.result(WAIT_S).model_id == "tiny-test" for future in waiting)
        for client in clients:
            client.close()


def test_uploads_in_progress_reserve_the_volume_memory(engine):  # noqa: F811
    limits = ServiceLimits(volume_memory_bytes=100_000)
    with LiveServer(create_app(engine, limits=limits)) as server, server.client() as client:
        volume = np.zeros((5, 100, 60), np.int16)  # 60 000 bytes: one fits, two do not
        body, params = encode_volume(volume, (1.0, 1.0, 1.0))
        query = "&".join(f"{key}={value}" for key, value in params.items())
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), WAIT_S) as slow:
            slow.sendall(f"POST {p.ROUTE_VOLUMES}?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
            _wait_until(lambda: server.service.volumes._reserved > 0, "the slow upload did not start")
            with pytest.raises(c.ServerBusyError, match="uploads in progress"):
                client.upload_volume(volume, (1.0, 1.0, 1.0))
            slow.sendall(body[1000:])
            slow.settimeout(WAIT_S)
            assert slow.recv(65536).startswith(b"HTTP/1.1 201")
        assert client.upload_volume(volume, (1.0, 1.0, 1.0)).shape == (5, 100, 60)  # the older one made room


def test_idle_connections_are_closed_and_connections_are_capped(engine):  # noqa: F811
    with LiveServer(create_app(engine), keep_alive_s=1.5, max_connections=3) as server:
        port = int(server.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), WAIT_S) for _ in range(3)]
        response = requests.get(server.url + p.ROUTE_HEALTH, timeout=WAIT_S)  # a fourth connection
        assert response.status_code == 503
        for sock in idle:  # never sent a byte: the server closes them
            sock.settimeout(WAIT_S)
            assert sock.recv(1) == b""
            sock.close()
        _wait_until(lambda: requests.get(server.url + p.ROUTE_HEALTH, timeout=WAIT_S).status_code == 200,
                    "the server did not take connections again")


def test_a_client_leaving_mid_upload_is_one_info_line(engine, caplog):  # noqa: F811
    with LiveServer(create_app(engine)) as server, caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), WAIT_S) as leaving:
            leaving.sendall(f"POST {p.ROUTE_VOLUMES}?shape=2,100,100&dtype=int16&spacing_mm=1,1,1&token=secret "
                            "HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                            "Content-Length: 40000\r\n\r\n".encode() + b"\0" * 1000)
            _wait_until(lambda: server.service.volumes._reserved > 0, "the upload did not start")
        _wait_until(lambda: any("closed the connection" in r.getMessage() for r in caplog.records),
                    "the dropped upload was not logged")
        assert server.service.volumes._reserved == 0  # its reservation is given back
    lines = [record for record in caplog.records if record.name.startswith(("backend", "uvicorn"))]
    assert [(r.levelno, r.exc_info) for r in lines if "closed the connection" in r.getMessage()] == \
           [(logging.INFO, None)]
    assert not [r for r in lines if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "secret" in r.getMessage()]


def test_an_unexpected_error_is_one_500_logged_once(engine, caplog):  # noqa: F811
    # A ValueError from inside the model is a bug of the server, not the client's input: 500, not 422.
    failures = iter([ValueError("expected sequence of length 4 at dim 1 (got 3)")])

    def fail_once() -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    uvicorn_records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = uvicorn_records.append  # uvicorn's loggers do not propagate to caplog
    server = LiveServer(create_app(GatedEngine(engine, fail_once)))  # configures uvicorn's logging: add after
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with server, caplog.at_level(logging.INFO):
            response = requests.post(server.url + p.ROUTE_QUERY, data=_query(), headers=JSON, timeout=WAIT_S)
            assert response.status_code == 500
            message = p.ErrorResponse.from_dict(response.json()).message
            request_id = response.headers["X-Request-ID"]
            assert "ValueError" in message and f"request id {request_id}" in message
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    errors = [r for r in caplog.records + uvicorn_records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # one entry, with its traceback
    assert request_id in errors[0].getMessage()  # the id the user reports finds the traceback


def test_shutdown_answers_every_waiting_query(engine):  # noqa: F811
    gate = Gate()
    gate.close()
    with ThreadPoolExecutor(4) as pool:
        with LiveServer(create_app(GatedEngine(engine, gate)), grace_s=0.5) as server:
            clients = [server.client() for _ in range(4)]
            answers = [pool.submit(client.query_slice, _slice(0), REFER, (1.0, 1.0)) for client in clients]
            gate.wait_until_held()
            _wait_until(lambda: server.service.worker.queued == 3, "the queries were not queued")
        # The server stopped while its engine call was still held, past the grace period.
        for answer in answers:
            with pytest.raises(c.ServerBusyError, match="shutting down") as error:
                answer.result(WAIT_S)
            assert error.value.status == 503
        gate.open()  # let the engine thread end before the test process does
        _wait_until(lambda: not server.service.worker.busy, "the engine call did not end")
        for client in clients:
            client.close()
