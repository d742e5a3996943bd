"""Start, reuse and stop a local `minigpt-pancreas serve` as a child process, as SlicerMONAIAuto3DSeg does.

The server runs outside Slicer's Python (it needs torch): the executable of the project's own environment, by
default `<checkout>/.venv/bin/minigpt-pancreas` when the module runs from a source checkout, with the bundled demo
model. `/healthz` is probed first, so a server already answering at the URL is reused and never started twice. The
child's output is collected line by line in a thread and handed out by `log_lines()` (the Widget prints it to the
Python console from its GUI thread). `launch` is how the process starts: `slicer.util.launchConsoleProcess` in
Slicer (startup environment, hidden console on Windows), `popen_launch` elsewhere; both give a Popen whose stdout
carries stdout and stderr together.
"""

from __future__ import annotations

import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.client import ClientError, MiniGPTPancreasClient, ServerError
from SlicerMiniGPTPancreas.errors import UserError

CHECKOUT_DIR = Path(__file__).resolve().parents[2]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT_S = 300.0  # importing torch and loading a 7B model from disk takes minutes on some machines
PROBE_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 10.0
REUSED, STARTED = "reused", "started"


class LocalServerError(UserError, RuntimeError):
    """The local server cannot be started or did not come up; the message names the command that works."""


def default_executable() -> str:
    """The checkout's own environment when there is one, else `minigpt-pancreas` from the PATH."""
    scripts = ("Scripts", "minigpt-pancreas.exe") if sys.platform == "win32" else ("bin", "minigpt-pancreas")
    candidate = CHECKOUT_DIR / ".venv" / scripts[0] / scripts[1]
    return str(candidate) if candidate.is_file() else "minigpt-pancreas"


def default_model_dir() -> str:
    """The bundled demo model of the checkout ('' when the module is installed without it)."""
    folder = CHECKOUT_DIR / "backend" / "demo_model" / "model"
    return str(folder) if folder.is_dir() else ""


def popen_launch(args: Sequence[str]) -> subprocess.Popen:
    """Start `args` with stdout and stderr merged into one text pipe (what launchConsoleProcess gives in Slicer)."""
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


def serve_command(executable: str, model_dir: str, url: str) -> list[str]:
    """The full command line: `<executable> serve [--model DIR] --host H --port P` for the URL's host and port."""
    parts = urlsplit(url)
    command = [executable, "serve"] + (["--model", model_dir] if model_dir else [])
    return command + ["--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 80)]


class LocalServer:
    """One `minigpt-pancreas serve` child at a loopback URL; `start` reuses a server already answering there."""

    def __init__(self, executable: str | None = None, model_dir: str | None = None,
                 launch: Callable[[Sequence[str]], Any] = popen_launch) -> None:
        self.executable = executable or default_executable()
        self.model_dir = default_model_dir() if model_dir is None else model_dir
        self.launch = launch  # Slicer: slicer.util.launchConsoleProcess (outside Slicer's own Python environment)
        self.process: Any = None
        self.command: list[str] = []
        self._log: queue.Queue[str] = queue.Queue()

    def start(self, client: MiniGPTPancreasClient) -> str:
        """REUSED when a server already answers at the client's URL, else STARTED (the child is now loading)."""
        if self.running:
            return STARTED
        if self._answers(client):
            return REUSED
        if urlsplit(client.base_url).hostname not in LOOPBACK_HOSTS:
            raise LocalServerError(f"{client.base_url} is not on this computer; a local server listens on "
                                   "http://127.0.0.1:<port>. Change the URL, or start the remote server there.")
        self.command = serve_command(self.executable, self.model_dir, client.base_url)
        if os.sep in self.executable and not Path(self.executable).is_file():
            raise LocalServerError(f"{self.executable} does not exist. Set the server executable (the "
                                   f"`minigpt-pancreas` of the project's environment); the command is: {self.shown}")
        try:
            self.process = self.launch(self.command)
        except OSError as error:
            raise LocalServerError(f"Cannot run {self.shown}: {error}. Install the backend (`make demo` in the "
                                   "project creates .venv) and set its `minigpt-pancreas` as the executable.") \
                from error
        threading.Thread(target=self._pump, args=(self.process,), daemon=True, name="minigpt-pancreas log").start()
        return STARTED

    def wait_ready(self, client: MiniGPTPancreasClient, timeout_s: float = START_TIMEOUT_S,
                   should_cancel: Callable[[], bool] = lambda: False) -> p.Health:
        """Block until /healthz says "ok" (any thread); LocalServerError when the child exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not should_cancel():
            try:
                health = client.check_connection()
                if health.status == "ok":
                    return health
            except ServerError as error:  # it listens, but its model failed to load: waiting will not help
                raise LocalServerError(f"{error} The command was: {self.shown}") from error
            except ClientError:
                pass  # not listening yet
            if self.process is not None and self.process.poll() is not None:
                raise LocalServerError(f"The server stopped (exit code {self.process.returncode}) before it was "
                                       f"ready; its log is in the Python console. The command was: {self.shown}")
            if time.monotonic() > deadline:
                raise LocalServerError(f"The server did not become ready within {timeout_s:g} s. Look at its log "
                                       f"in the Python console; the command is: {self.shown}")
            time.sleep(PROBE_INTERVAL_S)
        raise LocalServerError("Cancelled while waiting for the server to start.")

    @property
    def running(self) -> bool:
        """True while this object's child process is alive (a reused server is not ours)."""
        return self.process is not None and self.process.poll() is None

    @property
    def shown(self) -> str:
        """The command of the last start as one copyable line."""
        return shlex.join(self.command) if self.command else "(a server this module did not start)"

    def command_line(self, url: str) -> str:
        """The command that would serve `url`, as one copyable line."""
        return shlex.join(serve_command(self.executable, self.model_dir, url))

    def stop(self) -> int | None:
        """Stop the child (terminate, then kill after STOP_TIMEOUT_S); its exit code, None when none was running."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        return process.returncode

    def log_lines(self) -> list[str]:
        """The child's output lines collected since the last call, oldest first; never blocks."""
        lines = []
        while not self._log.empty():
            lines.append(self._log.get_nowait())
        return lines

    @staticmethod
    def _answers(client: MiniGPTPancreasClient) -> bool:
        try:
            return client.health().status in ("ok", "loading")
        except ClientError:
            return False

    def _pump(self, process: Any) -> None:
        """Collect the child's lines as UTF-8, whatever codec the launcher's text pipe has (Slicer's uses the locale's,
        which cannot decode the progress bars of the model loading on every system): read the bytes underneath."""
        for line in getattr(process.stdout, "buffer", process.stdout):
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            self._log.put(text.rstrip("\r\n"))
