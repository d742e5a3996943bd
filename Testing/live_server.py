"""A real uvicorn server on 127.0.0.1 for tests that talk HTTP to the service (service and Slicer-module tests)."""

from __future__ import annotations

import threading
import time

from SlicerMiniGPTPancreas import client as c

WAIT_S = 20.0  # generous bound on any wait; the suite never relies on it for timing


class LiveServer:
    """A uvicorn server for `app` on 127.0.0.1:<free port> in a background thread; a context manager."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the server did not shut down"

    @property
    def service(self):
        return self.app.state.service

    def client(self, token: str | None = None) -> c.MiniGPTPancreasClient:
        return c.MiniGPTPancreasClient(self.url, token=token, read_timeout=WAIT_S)
