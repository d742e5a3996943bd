"""The one thread that owns the inference engine (and so the GPU).

HTTP handlers never call the model: they submit tasks here and wait on a future. Interactive tasks (a slice query,
a chat turn) go first, in arrival order; sweep jobs advance one batch at a time between them, round robin, so a
whole-volume sweep never holds a single-slice question up for longer than one batch. Both queues are bounded;
a full queue is refused at once (QueueFullError -> HTTP 503 with Retry-After) instead of piling up.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

from SlicerMiniGPTPancreas.errors import UserError

log = logging.getLogger(__name__)
SWEEP_BATCHES_GUESS = 10  # a sweep's remaining batches are unknown here; guess for Retry-After
RECENT_CALLS = 20  # Retry-After is estimated from the median of this many recent engine calls
STOP_WAIT_S = 2.0  # at exit, how long to wait for an engine call still running (its answer is no longer awaited)


class WorkerUnavailableError(RuntimeError):
    """The engine cannot take work: still loading, failed to load, or shutting down."""

    def __init__(self, message: str, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # None: retrying will not help


class QueueFullError(RuntimeError):
    """Too much work is already waiting; `retry_after_s` estimates when there will be room."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatchJob(Protocol):
    """Work done in batches on the worker (a sweep job): advance one batch, say whether more remain."""

    @property
    def finished(self) -> bool: ...

    def run_next_batch(self, engine: Any) -> bool: ...

    def cancel(self, message: str | None = None) -> None: ...


@dataclass(frozen=True)
class Timed:
    """A task's result and how long it waited in the queue before the worker started it."""

    value: Any
    queue_ms: float


@dataclass
class _Task:
    run: Callable[[Any], Any]  # engine -> value
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)


class EngineWorker:
    """Owns the engine on one thread. Give `engine`, or `load_engine` to build it on that thread (health: loading)."""

    def __init__(self, engine: Any = None, *, load_engine: Callable[[], Any] | None = None, max_queue: int = 8,
                 max_sweeps: int = 4) -> None:
        if (engine is None) == (load_engine is None):
            raise ValueError("give exactly one of engine and load_engine")
        self._engine = engine
        self._load_engine = load_engine
        self.max_queue = max_queue
        self.max_sweeps = max_sweeps
        self.state = "ok" if engine is not None else "loading"  # a protocol HEALTH_STATES value
        self.load_error: str | None = None
        self._tasks: deque[_Task] = deque()
        self._sweeps: deque[BatchJob] = deque()
        self._current: _Task | BatchJob | None = None
        self._stopping = False  # no new work (a shutdown began); what is queued still runs until the deadline
        self._quit = False  # the thread ends after the engine call in progress
        self._recent_s: deque[float] = deque(maxlen=RECENT_CALLS)  # durations of engine calls, for Retry-After
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._main, name="minigpt-engine", daemon=True)

    @property
    def engine(self) -> Any:
        """The engine once loaded (None before); for reading its description (model_id, device...), not to run."""
        return self._engine

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._current is not None or bool(self._tasks) or bool(self._sweeps)

    @property
    def queued(self) -> int:
        """Slice queries and chat turns waiting for the engine (not counting the one it runs)."""
        with self._cond:
            return len(self._tasks)

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_alive(self) -> bool:
        """Still in an engine call (or loading) after `stop`: native code that the interpreter cannot end."""
        return self._thread.is_alive()

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new work and cancel the sweeps at once; queued tasks still run for `grace_s`, then every task
        still waiting or running is answered "shutting down" (WorkerUnavailableError)."""
        with self._cond:
            self._stopping = True
            jobs = list(self._sweeps) + ([self._current] if _is_batch(self._current) else [])
            self._sweeps = deque()
        for job in jobs:
            job.cancel("the server shut down")
        timer = threading.Timer(grace_s, self._fail_waiting)
        timer.daemon = True
        timer.start()

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """End the thread: what is still waiting is answered "shutting down"; a running engine call gets
        `timeout_s` to end (the thread is a daemon: the process does not wait for it longer)."""
        self.begin_shutdown(0.0)
        self._fail_waiting()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the model is still busy (loading or answering) after %.0f s; not waiting for it",
                            timeout_s)

    def _fail_waiting(self) -> None:
        stopping = WorkerUnavailableError("the server is shutting down", None)
        with self._cond:
            self._quit = True
            pending, self._tasks = list(self._tasks), deque()
            current = self._current
            self._cond.notify_all()
        for task in pending + ([current] if isinstance(current, _Task) else []):
            if task is current or task.future.set_running_or_notify_cancel():
                _settle(task.future, exception=stopping)

    def submit(self, run: Callable[[Any], Any]) -> Future:
        """Queue `run(engine)`; the future gives a Timed. A future cancelled before it starts is skipped."""
        task = _Task(run)
        with self._cond:
            self._check_room()
            self._tasks.append(task)
            self._cond.notify_all()
        task.future.add_done_callback(lambda future: self._forget(task) if future.cancelled() else None)
        return task.future

    def _forget(self, task: _Task) -> None:
        """A task cancelled before it ran (its client left or gave up) leaves the queue at once."""
        with self._cond:
            if task in self._tasks:
                self._tasks.remove(task)

    def add_sweep(self, job: BatchJob) -> None:
        """Queue a batch job; it runs a batch at a time until it reports no more work or is finished."""
        with self._cond:
            self._check_available()
            # A cancelled sweep stops counting at once, even while its last batch is still on the engine.
            active = sum(not job.finished for job in self._sweeps)
            active += _is_batch(self._current) and not self._current.finished
            if active >= self.max_sweeps:
                raise QueueFullError(f"the limit of {self.max_sweeps} sweep(s) running or waiting is reached; "
                                     "wait for one to finish or cancel one",
                                     self._retry_after_s(active * SWEEP_BATCHES_GUESS))
            self._sweeps.append(job)
            self._cond.notify_all()

    # --- the worker thread ----------------------------------------------------------------------------------------

    def _check_available(self) -> None:
        if self._stopping:
            raise WorkerUnavailableError("the server is shutting down", None)
        if self.state == "loading":
            raise WorkerUnavailableError("the model is still loading", 10)
        if self.state == "error":
            raise WorkerUnavailableError(f"the model failed to load: {self.load_error.rstrip('.')}; then restart "
                                         "the server", None)

    def check_available(self) -> None:
        """Raise WorkerUnavailableError while the engine cannot take work (loading, failed, shutting down)."""
        with self._cond:
            self._check_available()

    def check_room(self) -> None:
        """Raise now what `submit` would: lets a handler refuse a query before it reads the query's body."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        self._check_available()
        if len(self._tasks) >= self.max_queue:
            raise QueueFullError(f"the limit of {self.max_queue} request(s) waiting for the model is reached",
                                 self._retry_after_s(len(self._tasks) + 1))

    def _retry_after_s(self, calls_ahead: int) -> int:
        """Seconds until `calls_ahead` engine calls are done, from the median of recent ones (1 s before any)."""
        call_s = statistics.median(self._recent_s) if self._recent_s else 1.0
        return max(1, min(300, math.ceil(call_s * calls_ahead)))

    def _main(self) -> None:
        if self._load_engine is not None and not self._load():
            return
        while True:
            with self._cond:
                while not self._quit and not self._tasks and not self._sweeps:
                    self._cond.wait()
                if self._quit:
                    return
                item = self._tasks.popleft() if self._tasks else self._sweeps.popleft()
                self._current = item
            more = False
            try:
                more = self._run(item)
            except Exception:  # noqa: BLE001 - a job's own errors end the job; this keeps the thread alive
                log.exception("the engine thread failed on %r", item)
            finally:
                with self._cond:
                    self._current = None
                    if more and not self._stopping:
                        self._sweeps.append(item)

    def _load(self) -> bool:
        try:
            engine = self._load_engine()
        except UserError as error:  # a damaged model folder, say: its message says what to do, one log line
            log.error("the model failed to load: %s", error)
            self._fail_loading(str(error))
            return False
        except Exception as error:  # noqa: BLE001 - shown by /healthz and the log, the server stays up to say so
            log.exception("the model failed to load")
            self._fail_loading(f"{type(error).__name__}: {error}; the server log has the traceback")
            return False
        with self._cond:
            self._engine = engine
            self.state = "ok"
        log.info("model %s ready on %s", getattr(engine, "model_id", "?"), getattr(engine, "device", "?"))
        return True

    def _fail_loading(self, message: str) -> None:
        with self._cond:
            self.load_error = message
            self.state = "error"

    def _run(self, item: _Task | BatchJob) -> bool:
        """Run one task or one batch of a job; True when the job has more batches."""
        if isinstance(item, _Task):
            if not item.future.set_running_or_notify_cancel():
                return False  # its caller gave up waiting
            started = time.monotonic()
            try:
                value = item.run(self._engine)
            except BaseException as error:  # noqa: BLE001 - handed to the waiting request
                _settle(item.future, exception=error)
            else:
                _settle(item.future, result=Timed(value, (started - item.submitted) * 1000.0))
            self._record(time.monotonic() - started)
            return False
        if item.finished:
            return False
        started = time.monotonic()
        more = item.run_next_batch(self._engine)
        self._record(time.monotonic() - started)
        return more

    def _record(self, seconds: float) -> None:
        self._recent_s.append(seconds)


def _is_batch(item: Any) -> bool:
    return item is not None and not isinstance(item, _Task)


def _settle(future: Future, *, result: Any = None, exception: BaseException | None = None) -> None:
    """Complete a task's future, unless a shutdown already answered it while the engine was still running it."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
