"""A background task for the Widget: one thread runs a blocking call, a queue carries what it reports.

The GUI thread never waits: it starts the task, drains the queue from a timer (a `qt.QTimer` in the Widget) and
handles each event there, where it may touch Qt widgets and MRML nodes. The task itself must touch neither; it
reports progress through `report` and polls `is_cancelled` between steps. Pure Python threading, no Qt.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PROGRESS, FINISHED, FAILED = "progress", "finished", "failed"
# The Widget's timer period while a task runs: an answer waits at most this long to be shown. A question may cost
# 50 ms over the server's own time, and HTTP, JSON and a busy CPU take most of that (Testing/bench_module_overhead.py);
# a drain of an empty queue costs microseconds, so 200 of them a second while a task runs are free.
DRAIN_INTERVAL_MS = 5

TaskFunction = Callable[[Callable[[Any], None], Callable[[], bool]], Any]


@dataclass(frozen=True)
class TaskEvent:
    """`kind` PROGRESS (payload: what the task reported), FINISHED (its result) or FAILED (the exception)."""

    kind: str
    payload: Any


class BackgroundTask:
    """Runs `function(report, is_cancelled)` once in a daemon thread; `drain()` returns its events in order.

    Exactly one FINISHED or FAILED event ends the stream. Cancelling only sets a flag: the function decides when to
    stop, and a blocking network call finishes first (the Widget then drops the late answer).
    """

    def __init__(self, function: TaskFunction, name: str = "MiniGPT-Pancreas task") -> None:
        self._function = function
        self._events: queue.Queue[TaskEvent] = queue.Queue()
        self._cancelled = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Ask the task to stop at its next check."""
        self._cancelled.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    @property
    def ended(self) -> bool:
        """True once the function has returned or raised (its last event may still wait in the queue)."""
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the function has ended (for scripts and tests; a GUI drains instead); False on timeout."""
        return self._ended.wait(timeout)

    def drain(self) -> list[TaskEvent]:
        """Every event queued so far, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def _run(self) -> None:
        try:
            result = self._function(self._report, self._cancelled.is_set)
        except BaseException as error:  # noqa: BLE001 - every failure must reach the GUI thread, not die here
            self._events.put(TaskEvent(FAILED, error))
        else:
            self._events.put(TaskEvent(FINISHED, result))
        finally:
            self._ended.set()

    def _report(self, payload: Any) -> None:
        self._events.put(TaskEvent(PROGRESS, payload))


class TaskRunner:
    """The Widget's one running task: `start` it, `poll()` it from a timer, `cancel()` it.

    Cancelling a task started with `drop_when_cancelled` (a single question) frees the runner at once: the thread
    finishes its network call in the background and its late answer is dropped, never handed to `on_finished`.
    Other tasks (a sweep) are asked to stop and still end through `on_finished` with what they have.
    """

    def __init__(self) -> None:
        self._task: BackgroundTask | None = None
        self._on_finished: Callable[[Any], None] = lambda result: None
        self._on_progress: Callable[[Any], None] = lambda payload: None
        self._drop_when_cancelled = False

    @property
    def busy(self) -> bool:
        return self._task is not None

    def start(self, function: TaskFunction, on_finished: Callable[[Any], None],
              on_progress: Callable[[Any], None] | None = None, *,
              drop_when_cancelled: bool = False) -> BackgroundTask:
        if self._task is not None:
            raise RuntimeError("A MiniGPT-Pancreas task is already running; wait for it or cancel it.")
        self._task, self._on_finished = BackgroundTask(function), on_finished
        self._on_progress = on_progress or (lambda payload: None)
        self._drop_when_cancelled = drop_when_cancelled
        self._task.start()
        return self._task

    def cancel(self) -> bool:
        """Ask the task to stop; True when the runner is free at once (the task's result will be dropped)."""
        if self._task is None:
            return True
        self._task.cancel()
        if self._drop_when_cancelled:
            self._task = None
        return self._task is None

    def poll(self) -> None:
        """Hand the task's events to the callbacks on this (GUI) thread; re-raise the task's exception."""
        task = self._task
        if task is None:
            return
        for event in task.drain():
            if event.kind == PROGRESS:
                self._on_progress(event.payload)
                continue
            self._task = None
            if event.kind == FAILED:
                raise event.payload
            self._on_finished(event.payload)
            return
