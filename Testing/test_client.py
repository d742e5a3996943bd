"""The HTTP client against a real loopback HTTP server: every failure becomes a message a radiologist can act on."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import requests

from SlicerMiniGPTPancreas import client as c
from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.wire_arrays import decode_volume

TOKEN = "s3cret-token"


@dataclass
class Reply:
    """What the test server answers: a status, a JSON-able body (or raw bytes), headers, an optional delay."""

    status: int = 200
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port>; routes map (method, path) to a Reply or Seen -> Reply."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Reply | Callable[[Seen], Reply]] = {}
        self.seen: list[Seen] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # a short poll interval makes shutdown() quick (the default 0.5 s would dominate the test time)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def reply_for(self, seen: Seen) -> Reply:
        self.seen.append(seen)
        route = self.routes.get((seen.method, seen.path))
        if route is None:  # what FastAPI answers for an unknown route
            return Reply(404, {"detail": "Not Found"})
        return route(seen) if callable(route) else route

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler_for(server: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length", 0))
            seen = Seen(self.command, parts.path, dict(parse_qsl(parts.query)), dict(self.headers.items()),
                        self.rfile.read(length))
            reply = server.reply_for(seen)
            time.sleep(reply.delay_s)
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            try:
                self.send_response(reply.status)
                for name, value in {"Content-Type": "application/json", **reply.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def server():
    loopback = LoopbackServer()
    yield loopback
    loopback.close()


@pytest.fixture
def client(server):
    with c.MiniGPTPancreasClient(server.url, connect_timeout=2.0, read_timeout=5.0) as api:
        yield api


def _health(api_version: str = p.API_VERSION, status: str = "ok") -> dict:
    return p.Health(status, api_version, "minigpt-pancreas-demo", "cuda:0", False).to_dict()


def _error(code: p.ErrorCode, message: str) -> Reply:
    return Reply(code.http_status, p.ErrorResponse(code, message).to_dict())


# --- success paths --------------------------------------------------------------------------------------------------

def test_health_sends_the_api_version_and_no_token(server, client):
    server.routes["GET", "/healthz"] = Reply(body=_health())
    health = client.check_connection()
    assert (health.status, health.model_id, health.device, health.busy) == \
        ("ok", "minigpt-pancreas-demo", "cuda:0", False)
    sent = server.seen[-1]
    assert sent.headers[p.API_VERSION_HEADER] == p.API_VERSION
    assert "Authorization" not in sent.headers


def test_query_slice_sends_the_exact_slice_and_returns_boxes(server, client):
    slice_hu = np.array([[-1024, -150, 0], [40, 250, 3071]], dtype=np.int16)
    received = {}

    def answer(seen: Seen) -> Reply:
        received["request"] = p.SliceQueryRequest.from_dict(seen.json())  # the server's own decoding
        box = p.BoxResult((0.5, 0.0, 2.0, 1.0), "pancreas", 0.9)
        return Reply(body=p.QueryResponse("{<10><0><66><50>}", "boxes", "demo", (box,), slice_index=4).to_dict())

    server.routes["POST", p.ROUTE_QUERY] = answer
    response = client.query_slice(slice_hu, "[refer] where is the pancreas?", (0.7, 0.8), slice_index=4)
    np.testing.assert_array_equal(received["request"].slice_hu, slice_hu)
    assert received["request"].pixel_spacing_mm == (0.7, 0.8) and received["request"].slice_index == 4
    assert response.boxes[0].box == (0.5, 0.0, 2.0, 1.0) and response.boxes[0].label == "pancreas"
    assert response.slice_index == 4


def test_volume_upload_and_sweep_lifecycle(server, client):
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 500  # [S, R, C]
    uploaded = {}

    def store(seen: Seen) -> Reply:
        uploaded["array"], uploaded["spacing"] = decode_volume(seen.body, seen.query)
        uploaded["content_type"] = seen.headers["Content-Type"]
        return Reply(201, p.VolumeUploadResponse("vol-1", (2, 3, 4), uploaded["spacing"]).to_dict())

    server.routes["POST", p.ROUTE_VOLUMES] = store
    server.routes["POST", p.ROUTE_SWEEPS] = lambda seen: Reply(
        202, p.SweepJobStatus("job-1", seen.json()["volume_id"], "queued", 0, 2).to_dict())
    result = p.QueryResponse("no", "yes_no", "demo", yes=False, yes_probability=0.1, slice_index=0)
    server.routes["GET", "/api/v1/sweeps/job-1"] = Reply(
        body=p.SweepJobStatus("job-1", "vol-1", "running", 1, 2, (result,)).to_dict())
    server.routes["DELETE", "/api/v1/sweeps/job-1"] = Reply(
        body=p.SweepJobStatus("job-1", "vol-1", "cancelled", 1, 2, (result,)).to_dict())

    stored = client.upload_volume(volume, (0.7, 0.7, 2.5))
    np.testing.assert_array_equal(uploaded["array"], volume)
    assert uploaded["spacing"] == (0.7, 0.7, 2.5) and uploaded["content_type"] == "application/octet-stream"
    assert stored.volume_id == "vol-1"
    job = client.start_sweep(stored.volume_id, "[vqa] is there a tumor?", step=1)
    assert server.seen[-1].json()["prompt"] == "[vqa] is there a tumor?"
    assert (job.state, job.total) == ("queued", 2)
    running = client.sweep_status(job.job_id)
    assert (running.done, running.results[0].yes, running.finished) == (1, False, False)
    cancelled = client.cancel_sweep(job.job_id)
    assert cancelled.state == "cancelled" and cancelled.finished and server.seen[-1].method == "DELETE"


def test_chat_round_trip(server, client):
    server.routes["POST", p.ROUTE_CHAT] = lambda seen: Reply(body=p.ChatResponse(
        f"you asked: {seen.json()['messages'][-1]['text']}", "demo").to_dict())
    reply = client.chat([p.ChatMessage("user", "describe this slice")], np.zeros((4, 4), np.int16), (1.0, 1.0))
    assert reply.answer == "you asked: describe this slice"


# --- tokens -------------------------------------------------------------------------------------------------------

def _guarded(seen: Seen) -> Reply:
    if seen.headers.get("Authorization") != f"Bearer {TOKEN}":
        return _error(p.ErrorCode.UNAUTHORIZED, "missing or wrong bearer token")
    return Reply(body=_health())


def test_missing_token_asks_for_one(server, client):
    server.routes["GET", "/healthz"] = _guarded
    with pytest.raises(c.AuthenticationError, match="requires an access token") as caught:
        client.health()
    assert caught.value.status == 401 and server.url in str(caught.value)


def test_wrong_token_is_rejected_without_revealing_it(server):
    server.routes["GET", "/healthz"] = _guarded
    with c.MiniGPTPancreasClient(server.url, token="not-the-token") as api:
        with pytest.raises(c.AuthenticationError, match="rejected the access token") as caught:
            api.health()
        assert "not-the-token" not in str(caught.value) and "not-the-token" not in repr(api)
    assert server.seen[-1].headers["Authorization"] == "Bearer not-the-token"


def test_right_token_is_sent_as_a_bearer_header(server):
    server.routes["GET", "/healthz"] = _guarded
    with c.MiniGPTPancreasClient(server.url, token=f"  {TOKEN}\n") as api:  # pasted with whitespace
        assert api.health().status == "ok"
    assert server.seen[-1].headers["Authorization"] == f"Bearer {TOKEN}"


# --- server-side failures -------------------------------------------------------------------------------------------

def test_major_version_mismatch_is_refused_with_which_side_to_update(server, client):
    server.routes["GET", "/healthz"] = Reply(body=_health("2.0"))
    with pytest.raises(c.VersionMismatchError) as caught:
        client.check_connection()
    assert "API 2.0" in str(caught.value) and f"API {p.API_VERSION}" in str(caught.value)
    assert "Update the client" in str(caught.value)
    server.routes["GET", "/healthz"] = Reply(body=_health("1.9"))  # minor differences are compatible
    assert client.check_connection().api_version == "1.9"


def test_server_refusing_the_client_version(server, client):
    server.routes["GET", p.ROUTE_INFO] = _error(p.ErrorCode.VERSION_MISMATCH, "this server speaks API 3.0")
    refused = f"refuses this client's API {p.API_VERSION}: this server speaks API 3.0"
    with pytest.raises(c.VersionMismatchError, match=refused):
        client.info()


def test_model_that_failed_to_load_points_at_the_server_log(server, client):
    server.routes["GET", "/healthz"] = Reply(body=_health(status="error"))
    with pytest.raises(c.ServerError, match="model failed to load.*server log"):
        client.check_connection()


def test_unknown_endpoint_suggests_a_wrong_url_or_an_older_server(server, client):
    with pytest.raises(c.EndpointNotFoundError) as caught:
        client.info()
    message = str(caught.value)
    assert "no endpoint GET /api/v1/info" in message and "older than this client" in message
    assert caught.value.status == 404


def test_unknown_volume_is_reported_as_such(server, client):
    server.routes["GET", "/api/v1/sweeps/job-9"] = _error(p.ErrorCode.NOT_FOUND, "no sweep job 'job-9'")
    with pytest.raises(c.ResourceNotFoundError, match="no sweep job 'job-9'. Upload the volume or start the job"):
        client.sweep_status("job-9")


def test_internal_error_points_at_the_server_log(server, client):
    server.routes["GET", p.ROUTE_INFO] = _error(p.ErrorCode.INTERNAL, "CUDA out of memory")
    with pytest.raises(c.ServerError) as caught:
        client.info()
    assert "HTTP 500" in str(caught.value) and "CUDA out of memory" in str(caught.value)
    assert "server log" in str(caught.value)


def test_busy_server_says_when_to_retry(server, client):
    server.routes["GET", "/healthz"] = Reply(503, p.ErrorResponse(p.ErrorCode.BUSY, "GPU queue full").to_dict(),
                                             {"Retry-After": "7"})
    with pytest.raises(c.ServerBusyError) as caught:
        client.health()
    assert caught.value.retry_after_s == 7.0
    assert "busy" in str(caught.value) and "GPU queue full" in str(caught.value) and "in 7 s" in str(caught.value)


def test_payload_too_large(server, client):
    server.routes["POST", p.ROUTE_VOLUMES] = _error(p.ErrorCode.PAYLOAD_TOO_LARGE, "limit is 64 MiB")
    with pytest.raises(c.PayloadTooLargeError, match=r"too large \(HTTP 413\): limit is 64 MiB"):
        client.upload_volume(np.zeros((2, 8, 8), np.int16), (1.0, 1.0, 1.0))


def test_fastapi_validation_details_are_shown(server, client):
    server.routes["POST", p.ROUTE_QUERY] = Reply(422, {"detail": [
        {"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]})
    with pytest.raises(c.RequestRejectedError, match=r"HTTP 422\): body.prompt: field required"):
        client.query_slice(np.zeros((4, 4), np.int16), "where?", (1.0, 1.0))


def test_invalid_json_reply(server, client):
    server.routes["GET", "/healthz"] = Reply(body=b"<html>It works!</html>", headers={"Content-Type": "text/html"})
    with pytest.raises(c.InvalidResponseError) as caught:
        client.health()
    assert "not valid JSON" in str(caught.value) and "<html>It works!" in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)


def test_reply_of_another_schema_names_the_field(server, client):
    server.routes["GET", "/healthz"] = Reply(body={"status": "ok", "api_version": "1.0", "model_id": "m"})
    with pytest.raises(c.InvalidResponseError, match=f"does not follow API {p.API_VERSION} .*Health.device: required"):
        client.health()


def test_redirect_is_not_followed(server, client):
    target = f"{server.url}/minigpt/healthz"  # on the same loopback server: a regression never leaves the machine
    server.routes["GET", "/healthz"] = Reply(307, {}, {"Location": target})
    server.routes["GET", "/minigpt/healthz"] = Reply(body=_health())
    with pytest.raises(c.ConnectionSettingsError, match=f"redirects GET /healthz to {target}. Use the final"):
        client.health()
    assert [seen.path for seen in server.seen] == ["/healthz"]


# --- transport failures -------------------------------------------------------------------------------------------

def test_read_timeout_says_which_timeout_and_how_long(server):
    server.routes["POST", p.ROUTE_QUERY] = Reply(body={}, delay_s=0.5)
    with c.MiniGPTPancreasClient(server.url, read_timeout=5.0) as api:
        with pytest.raises(c.ServerTimeoutError) as caught:
            api.query_slice(np.zeros((4, 4), np.int16), "where?", (1.0, 1.0), read_timeout=0.2)
    assert (caught.value.phase, caught.value.seconds) == ("read", 0.2)
    assert "read timeout of 0.2 s" in str(caught.value) and "POST /api/v1/query" in str(caught.value)
    assert isinstance(caught.value.__cause__, requests.exceptions.ReadTimeout)


def test_short_read_timeout_also_caps_quick_calls(server):
    server.routes["GET", "/healthz"] = Reply(body=_health(), delay_s=0.5)
    with c.MiniGPTPancreasClient(server.url, read_timeout=0.2) as api:
        with pytest.raises(c.ServerTimeoutError, match="read timeout of 0.2 s"):
            api.health()


def test_connection_refused_says_to_start_the_server():
    with socket.socket() as probe:  # a port that was just free: nothing listens there now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with c.MiniGPTPancreasClient(f"http://127.0.0.1:{port}") as api:
        with pytest.raises(c.ServerNotRunningError) as caught:
            api.health()
    assert str(caught.value) == (f"No MiniGPT-Pancreas server answers at http://127.0.0.1:{port}. Start it with "
                                 "`minigpt-pancreas serve` or check the address.")
    assert isinstance(caught.value.__cause__, requests.exceptions.ConnectionError)


# --- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "words"), [
    ("", "address is empty"),
    ("127.0.0.1:8765", "must start with http:// or https://"),
    ("ftp://127.0.0.1:8765", "must start with http:// or https://"),
    ("http://127.0.0.1:8765/api/v1", "without a path such as '/api/v1'"),
    ("http://127.0.0.1:8765/?x=1", "only scheme, host and port"),
    ("http://127.0.0.1:99999", "port in 1-65535"),
    ("http://:8765", "needs a host name"),
    ("http://user:pw@127.0.0.1:8765", "must not contain a user name or password"),
])
def test_bad_server_addresses_are_refused_before_any_request(url, words):
    with pytest.raises(c.ConnectionSettingsError) as caught:
        c.MiniGPTPancreasClient(url)
    assert words in str(caught.value) and isinstance(caught.value, ValueError)


def test_good_server_addresses_are_normalised():
    assert c.normalize_base_url(" https://gpu-box.local:8765/ ") == "https://gpu-box.local:8765"
    assert c.MiniGPTPancreasClient().base_url == c.DEFAULT_URL


def test_malformed_token_is_refused():
    with pytest.raises(c.ConnectionSettingsError, match="token contains spaces, line breaks"):
        c.MiniGPTPancreasClient(token="abc\ndef")
