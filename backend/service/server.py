"""The uvicorn server around the app: connection limits, time limits on requests, a graceful shutdown, quiet logs.

- Connections: at most `max_connections` connections or requests at once (beyond it a request is answered 503
  with the protocol's error body), a connection that sends nothing for `keep_alive_s` is closed, whether it is fresh
  or between requests, and so is one whose request arrives too slowly (`request_limits`: headers within seconds of
  their first byte, a body that keeps arriving); see connections.py.
- Shutdown (SIGTERM, Ctrl+C): uvicorn stops accepting connections; the service stops taking work, cancels its
  sweeps and answers every request still waiting (its result if the model gets to it within the grace period,
  else 503 "shutting down") before uvicorn's own grace period ends, so no client is left without an answer.
- Logs: the access log never shows a query string (a careless client might put a token there).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import uvicorn

from .connections import RequestTimeLimits, TimeLimitedH11

ANSWER_MARGIN_S = 1.0  # after the service's grace, uvicorn waits this much longer for the answers to go out


class ServiceServer(uvicorn.Server):
    """uvicorn.Server that lets the service answer its waiting requests before uvicorn's grace period ends."""

    async def shutdown(self, sockets: Any = None) -> None:
        service = getattr(getattr(self.config.app, "state", None), "service", None)
        if service is not None:
            service.begin_shutdown(max(0.0, self.config.timeout_graceful_shutdown - ANSWER_MARGIN_S))
        await super().shutdown(sockets)


class _NoQueryStrings(logging.Filter):
    """Cuts the query string from uvicorn's access log lines ('%s - "%s %s HTTP/%s" %d': the third is the path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def make_server(app: Any, host: str, port: int, *, log_level: str, grace_s: float, keep_alive_s: float,
                max_connections: int, request_limits: RequestTimeLimits = RequestTimeLimits()) -> ServiceServer:
    """The server for `app` (the service's create_app) with those limits; see the module docstring."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=partial(TimeLimitedH11, limits=request_limits),
                            timeout_keep_alive=keep_alive_s, limit_concurrency=max_connections,
                            timeout_graceful_shutdown=grace_s + ANSWER_MARGIN_S)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, _NoQueryStrings) for existing in access_log.filters):
        access_log.addFilter(_NoQueryStrings())
    return ServiceServer(config)
