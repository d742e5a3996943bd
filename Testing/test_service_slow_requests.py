"""Requests that arrive too slowly (slowloris), against a real uvicorn on 127.0.0.1 with time limits of about a
second (backend/service/connections.py): half-sent headers, a stalled or trickled body are closed with a 408 in
the protocol's error body, so they cannot hold the connection limit; a client at the minimum rate, a fast large
upload and a body the server itself holds back are not cut; the connection limit's 503 has the error body too.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from backend.service import ServiceLimits, create_app
from backend.service.connections import RequestTimeLimits
from gated_engine import WAIT_S
from live_server import LiveServer
from SlicerMiniGPTPancreas import protocol as p
from test_service import REFER, _slice, _wait_until, engine  # noqa: F401 (fixture)

LIMITS = RequestTimeLimits(header_s=1.0, body_s=1.0, body_min_rate=500.0)
CLOSED_WITHIN_S = 4.0  # the limits are 1 s; a loaded machine gets room, a connection kept for good does not
HALF_HEADERS = f"GET {p.ROUTE_HEALTH} HTTP/1.1\r\nHost: x\r\n".encode()


class TimedServer(LiveServer):
    """LiveServer with request time limits of about a second and a keep-alive far beyond them (so it is not what
    closes the connections)."""

    def __init__(self, app, *, max_connections: int = 64) -> None:
        from backend.service.server import make_server

        super().__init__(app)
        self.server = make_server(app, "127.0.0.1", 0, log_level="warning", grace_s=1.0, keep_alive_s=60.0,
                                  max_connections=max_connections, request_limits=LIMITS)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), WAIT_S)


def _query_head(length: int) -> bytes:
    return (f"POST {p.ROUTE_QUERY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _query_body() -> bytes:
    return json.dumps(p.SliceQueryRequest(REFER, _slice(0), (1.0, 1.0)).to_dict()).encode()


def _trickle(sock: socket.socket, data: bytes, chunk: int, every_s: float) -> None:
    """Sends `data` `chunk` bytes every `every_s` seconds, until it is sent or the server answers or closes."""
    for start in range(0, len(data), chunk):
        try:
            sock.sendall(data[start:start + chunk])
        except OSError:
            return
        if select.select([sock], [], [], every_s)[0]:
            return


def _reply_then_close(sock: socket.socket, since: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (seconds after `since`); fails if it
    keeps the connection open."""
    sock.settimeout(CLOSED_WITHIN_S)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; it sent {received[:200]!r}") from None
    except ConnectionResetError:
        pass
    return received, time.monotonic() - since


def _error_code(reply: bytes, status: int) -> p.ErrorCode:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), reply[:300]
    assert b"application/json" in head.lower()
    return p.ErrorResponse.from_dict(json.loads(body)).code


def test_half_sent_and_trickled_headers_are_closed_with_a_408(engine):  # noqa: F811
    with TimedServer(create_app(engine)) as server, server.connect() as silent, server.connect() as trickling:
        started = time.monotonic()
        silent.sendall(HALF_HEADERS)
        # A byte every 0.2 s would keep any idle timeout from firing: the limit runs from the first byte.
        _trickle(trickling, HALF_HEADERS + b"X-Padding: " + b"x" * 200, 1, 0.2)
        for sock in (silent, trickling):
            reply, closed_after_s = _reply_then_close(sock, started)
            assert _error_code(reply, 408) is p.ErrorCode.BAD_REQUEST
            assert 0.8 < closed_after_s < CLOSED_WITHIN_S


def test_stalled_and_trickled_bodies_are_closed_with_a_408(engine):  # noqa: F811
    with TimedServer(create_app(engine)) as server, server.connect() as stalled, server.connect() as trickling:
        started = time.monotonic()
        stalled.sendall(_query_head(1000) + b"{")
        trickling.sendall(_query_head(2000))
        _trickle(trickling, b" " * 2000, 10, 0.05)  # 200 bytes/s, below the minimum of 500: 10 s if never cut
        for sock in (stalled, trickling):
            reply, closed_after_s = _reply_then_close(sock, started)
            assert _error_code(reply, 408) is p.ErrorCode.BAD_REQUEST
            assert 0.8 < closed_after_s < CLOSED_WITHIN_S


def test_slow_connections_cannot_lock_others_out(engine):  # noqa: F811
    with TimedServer(create_app(engine), max_connections=4) as server:
        slow = [server.connect()]
        slow[0].sendall(HALF_HEADERS)
        assert requests.get(server.url + p.ROUTE_HEALTH, timeout=WAIT_S).status_code == 200  # room left
        slow += [server.connect() for _ in range(3)]
        for sock in slow[1:]:
            sock.sendall(HALF_HEADERS)  # (a whole request would itself meet the limit, be answered and leave)
        _wait_until(lambda: len(server.server.server_state.connections) == 4, "the server did not take them all")
        full = requests.get(server.url + p.ROUTE_HEALTH, timeout=WAIT_S)
        assert full.status_code == 503
        assert p.ErrorResponse.from_dict(full.json()).code is p.ErrorCode.BUSY
        _wait_until(lambda: requests.get(server.url + p.ROUTE_HEALTH, timeout=WAIT_S).status_code == 200,
                    "the slow connections kept the server full")
        for sock in slow:
            sock.close()


def test_clients_at_the_minimum_rate_and_fast_large_uploads_are_not_cut(engine):  # noqa: F811
    with TimedServer(create_app(engine)) as server, server.connect() as steady, server.client() as client:
        body = _query_body()
        started = time.monotonic()
        steady.sendall(_query_head(len(body)))
        _trickle(steady, body, 100, 0.1)  # 1000 bytes/s: twice the minimum, for longer than the limits
        steady.settimeout(WAIT_S)
        reply = steady.recv(65536)
        assert time.monotonic() - started > 2 * LIMITS.body_s and reply.startswith(b"HTTP/1.1 200"), reply[:300]
        volume = np.zeros((16, 256, 512), np.int16)  # 4 MiB, over loopback: far above the minimum rate
        assert client.upload_volume(volume, (1.0, 1.0, 1.0)).shape == volume.shape


def test_a_body_the_server_holds_back_is_not_cut(engine):  # noqa: F811
    # One JSON body is read at a time: the second client's body waits unread (reading paused) while the first
    # one's arrives slowly, longer than the body limit. The wait is the server's doing, not the client's.
    app = create_app(engine, limits=ServiceLimits(max_bodies=1))
    with TimedServer(app) as server, server.connect() as first, ThreadPoolExecutor(1) as pool, \
            server.client() as second:
        body = _query_body()
        first.sendall(_query_head(len(body)) + body[:100])
        _wait_until(lambda: app.state.service.bodies._semaphore.locked(), "the first body was not being read")
        waiting = pool.submit(second.query_slice, _slice(1, (512, 512)), REFER, (1.0, 1.0))  # ~700 KB of JSON
        started = time.monotonic()
        _trickle(first, body[100:], 100, 0.1)
        first.settimeout(WAIT_S)
        assert first.recv(65536).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started > 2 * LIMITS.body_s
        assert waiting.result(WAIT_S).model_id == "tiny-test"
