"""uvicorn's h11 protocol with time limits on how a request arrives, and the connection limit's 503 in the
protocol's error body.

uvicorn (0.55) only times out a connection that is silent between requests: one that sends half a request and then
nothing, or trickles it, stays open for good, and --max-connections of them lock every other client out (before
any token check). So, per connection (RequestTimeLimits):
- a fresh connection that sends nothing for keep_alive_s is closed, as between requests;
- from a request's first byte, its headers must be complete within header_s;
- its body must keep arriving: the client starts with body_s seconds of credit, each byte received earns
  1 / body_min_rate seconds more, and the credit never exceeds body_s (a burst cannot buy a long silence). A client
  sending at least body_min_rate bytes/s is never cut, whatever the body's size; one that is silent for body_s, or
  slower on average, is. The clock stops while the server itself holds the body back (it paused reading until the
  app takes the bytes, or the client waits for "100 Continue"): what the client sent meanwhile waits in the
  socket buffers and counts when reading resumes.
Past a limit the connection is closed, after a 408 with the protocol's error body if no answer has begun.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from SlicerMiniGPTPancreas import protocol as p

from .errors import ApiError, error_reply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestTimeLimits:
    """How fast a request must arrive (see the module docstring). The defaults leave a slow link (64 kbit/s)
    room, yet make a client that holds a connection keep paying for it in bytes."""

    header_s: float = 10.0
    body_s: float = 20.0
    body_min_rate: float = 8192.0  # bytes per second


class TimeLimitedH11(H11Protocol):
    """H11Protocol that closes connections whose request arrives too slowly, and answers the connection limit
    with the protocol's error body; built by the server with the limits (functools.partial)."""

    def __init__(self, *args: Any, limits: RequestTimeLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._deadline: float | None = None  # when the request in progress must have arrived (or made progress)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._receiving_body = False
        # uvicorn answers its own concurrency limit with a plain-text 503 and offers no hook for the reply: turn its
        # check off and make the same one in front of the app.
        self.max_connections, self.limit_concurrency = self.limit_concurrency, None
        self._service_app, self.app = self.app, self._app_within_limit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timeout only after a response: a connection that never sends would stay.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track_request(len(data))

    def _track_request(self, n_bytes: int) -> None:
        """Starts, credits or stops the clock of the request in progress after `n_bytes` more arrived."""
        state = self.conn.their_state
        if state is h11.IDLE:  # the first bytes of a request's headers (h11 holds them until they are whole)
            if self._deadline is None:
                self._start_clock(self.limits.header_s)
        elif state is h11.SEND_BODY:
            now = self.loop.time()
            if not self._receiving_body:
                self._start_clock(self.limits.body_s)
                self._receiving_body = True
            assert self._deadline is not None
            self._deadline = min(self._deadline + n_bytes / self.limits.body_min_rate, now + self.limits.body_s)
        else:  # the request is whole (or the connection is over): what happens next is the app's or keep-alive's
            self._stop_clock()

    def _start_clock(self, seconds: float) -> None:
        self._stop_clock()
        self._deadline = self.loop.time() + seconds
        self._deadline_timer = self.loop.call_later(seconds, self._on_deadline)

    def _stop_clock(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_timer = None
        self._deadline = None
        self._receiving_body = False

    def _on_deadline(self) -> None:
        # The timer stays where it was set while bytes move the deadline (no rescheduling per chunk): look again.
        assert self._deadline is not None
        now = self.loop.time()
        if self._server_holds_body():
            self._deadline = now + self.limits.body_s
        if now < self._deadline:
            self._deadline_timer = self.loop.call_later(self._deadline - now, self._on_deadline)
        elif not self.transport.is_closing():
            self._time_out()

    def _server_holds_body(self) -> bool:
        waiting_for_continue = self.cycle is not None and self.cycle.waiting_for_100_continue
        return self._receiving_body and (self.flow.read_paused or waiting_for_continue)

    def _time_out(self) -> None:
        log.info("closing the connection from %s: its request did not arrive in time", self.client)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no answer has begun: say why
            self._send_timeout_reply()
        if self.cycle is not None and not self.cycle.response_complete:
            # The app must not answer on this connection any more; connection_lost would tell it only later.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._stop_clock()
        self.transport.close()

    def _send_timeout_reply(self) -> None:
        limits = self.limits
        reply = error_reply(ApiError(
            p.ErrorCode.BAD_REQUEST, f"the request arrived too slowly: its headers must arrive within "
            f"{limits.header_s:g} s, and its body without a pause of {limits.body_s:g} s and at "
            f"{limits.body_min_rate:g} bytes/s or more", status=408, headers={"Connection": "close"}))
        for event in (h11.Response(status_code=408, headers=reply.raw_headers, reason=b"Request Timeout"),
                      h11.Data(data=reply.body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))

    async def _app_within_limit(self, scope: Any, receive: Any, send: Any) -> None:
        # uvicorn's check, made once this request's task is in self.tasks (hence '>' where uvicorn has '>=').
        if len(self.connections) >= self.max_connections or len(self.tasks) > self.max_connections:
            self.logger.warning("Exceeded concurrency limit.")
            reply = error_reply(ApiError(p.ErrorCode.BUSY, f"the server has reached its limit of "
                                         f"{self.max_connections} connections; try again shortly",
                                         headers={"Connection": "close"}))
            await reply(scope, receive, send)
        else:
            await self._service_app(scope, receive, send)
