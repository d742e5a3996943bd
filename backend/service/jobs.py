"""Whole-volume sweep jobs: one prompt over a range of slices of an uploaded volume, a batch at a time.

The engine worker advances a job with `run_next_batch`; HTTP handlers read `status()` and call `cancel()` from other
threads, so the job's state is guarded by a lock. Cancelling takes effect at once: the job reads "cancelled", and
the answers of a batch still on the GPU are dropped. Finished jobs are kept for a while for late status calls; they
keep their answers but let go of the volume, so finished sweeps never hold voxels.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.validation import excerpt

from .engine_calls import query_response
from .errors import ApiError
from .volumes import StoredVolume

log = logging.getLogger(__name__)


class SweepJob:
    """Runs `run_batch(engine, slices) -> [SliceResult]` over `slice_indices` of `volume`, `batch_size` at a time."""

    def __init__(self, volume: StoredVolume, slice_indices: range, batch_size: int,
                 run_batch: Callable[[Any, list], list]) -> None:
        self.job_id = secrets.token_urlsafe(12)
        self.volume_id = volume.volume_id
        self._volume: StoredVolume | None = volume  # held while the job runs: evicting it from the store is fine
        self.slice_indices = slice_indices
        self.batch_size = batch_size
        self._run_batch = run_batch
        self.created = time.monotonic()
        self.finished_at: float | None = None
        self._state = "queued"
        self._message: str | None = None
        self._results: list[p.QueryResponse] = []
        self._lock = threading.Lock()

    @property
    def finished(self) -> bool:
        return self._state in p.SWEEP_FINISHED_STATES

    def status(self) -> p.SweepJobStatus:
        with self._lock:
            return p.SweepJobStatus(self.job_id, self.volume_id, self._state, len(self._results),
                                    len(self.slice_indices), tuple(self._results), self._message)

    def cancel(self, message: str | None = None) -> None:
        """Stop the job (no effect once finished); the answers so far stay readable."""
        with self._lock:
            if not self.finished:
                self._finish("cancelled", message or f"cancelled after {len(self._results)} of "
                                                      f"{len(self.slice_indices)} slices")

    def fail(self, message: str) -> None:
        with self._lock:
            if not self.finished:
                self._finish("failed", message)

    def run_next_batch(self, engine: Any) -> bool:
        """On the engine thread: answer the next batch of slices; True when more remain."""
        with self._lock:
            if self.finished:
                return False
            self._state = "running"
            start = len(self._results)
            indices = self.slice_indices[start:start + self.batch_size]
            slices = [self._volume.array[s] for s in indices]
        started = time.monotonic()
        try:
            results = self._run_batch(engine, slices)
        except UserError as error:  # bad input, e.g. a prompt the engine refuses
            self.fail(f"the engine refused slices {indices[0]}-{indices[-1]}: {error}")
            return False
        except Exception as error:  # noqa: BLE001 - reported in the job's status, logged with its traceback
            log.exception("sweep %s failed", self.job_id)
            self.fail(f"inference failed on slices {indices[0]}-{indices[-1]} ({type(error).__name__}: {error}); "
                      "the server log has the details")
            return False
        queue_ms = (started - self.created) * 1000.0
        model_id = engine.model_id
        responses = [query_response(result, model_id, slice_index=s, queue_ms=queue_ms)
                     for s, result in zip(indices, results)]
        with self._lock:
            if self.finished:  # cancelled while this batch ran
                return False
            self._results += responses
            if len(self._results) < len(self.slice_indices):
                return True
            self._finish("done", None)
            return False

    def _finish(self, state: str, message: str | None) -> None:
        self._state = state
        self._message = message
        self.finished_at = time.monotonic()
        self._volume = None


class JobStore:
    """Thread-safe map job_id -> SweepJob; finished jobs expire after `ttl_s`, and at most `max_finished` stay."""

    def __init__(self, ttl_s: float, max_finished: int = 64) -> None:
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self._jobs: dict[str, SweepJob] = {}
        self._lock = threading.Lock()

    def add(self, job: SweepJob) -> None:
        with self._lock:
            self._expire()
            self._jobs[job.job_id] = job

    def get(self, job_id: str) -> SweepJob:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(p.ErrorCode.NOT_FOUND,
                           f"no sweep job {excerpt(job_id)} on this server: it never existed, finished more than "
                           f"{self.ttl_s:g} s ago, or the server restarted")
        return job

    def cancel_all(self, message: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel(message)

    def _expire(self) -> None:
        finished = sorted((job for job in self._jobs.values() if job.finished_at is not None),
                          key=lambda job: job.finished_at)
        deadline = time.monotonic() - self.ttl_s
        too_many = len(finished) - self.max_finished
        for rank, job in enumerate(finished):
            if rank < too_many or job.finished_at < deadline:
                del self._jobs[job.job_id]
