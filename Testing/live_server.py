"""A real uvicorn server on 127.0.0.1 for tests that talk HTTP to the service (service and Slicer-module tests):
in a thread of the test process (LiveServer), or as a `minigpt-pancreas serve` process (ServeProcess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import requests

from SlicerMiniGPTPancreas import client as c

WAIT_S = 20.0  # generous bound on any wait; the suite never relies on it for timing


class LiveServer:
    """The service's uvicorn server (backend.service.server) for `app` on 127.0.0.1:<free port> in a background
    thread; a context manager."""

    def __init__(self, app, *, grace_s: float = 1.0, keep_alive_s: float = 5.0, max_connections: int = 64) -> None:
        from backend.service.server import make_server

        self.app = app
        self.server = make_server(app, "127.0.0.1", 0, log_level="warning", grace_s=grace_s,
                                  keep_alive_s=keep_alive_s, max_connections=max_connections)
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


class ServeProcess:
    """`minigpt-pancreas serve` as a real process on 127.0.0.1:<free port> (the bundled demo model unless `args`
    name one); a context manager that stops it with SIGTERM. For tests of signals and of the process's memory."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wait_s: float = 120.0) -> None:
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.wait_s = wait_s
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        command = [sys.executable, "-m", "backend.cli", "serve", "--port", str(self.port), "--device", "cpu",
                   *self.args]
        # Output goes to files, not pipes: a server blocked on a full pipe that nobody reads would hang the test.
        self._output = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.wait_s
        while True:
            assert self.process.poll() is None, f"the server stopped: {self.output()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not load its model"
            try:
                if requests.get(self.url + "/healthz", timeout=5).json().get("status") == "ok":
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.wait_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        """Everything the server printed and logged so far."""
        self._output.seek(0)
        return self._output.read()

    def resident_bytes(self) -> int:
        """The process's resident memory (VmRSS), Linux only."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            kib = next(line.split()[1] for line in status if line.startswith("VmRSS:"))
        return int(kib) * 1024

    def client(self, token: str | None = None) -> c.MiniGPTPancreasClient:
        return c.MiniGPTPancreasClient(self.url, token=token, read_timeout=self.wait_s)
