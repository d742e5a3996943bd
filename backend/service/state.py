"""What the routes share: the engine worker, the volume and job stores, the limits and the access check."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.wire_arrays import MAX_VOLUME_BYTES

from .bodies import BodySlots
from .jobs import JobStore
from .engine_calls import EngineCalls
from .security import BearerAuth
from .volumes import VolumeStore
from .worker import EngineWorker


@dataclass(frozen=True)
class ServiceLimits:
    """How much the service takes on at once; every limit is refused with a clear 4xx/503, never queued blindly."""

    max_queue: int = 8  # slice queries and chat turns waiting for the model
    max_sweeps: int = 4  # sweep jobs running or waiting
    max_bodies: int = 4  # JSON bodies read or parsed at once (each up to bodies.MAX_JSON_BYTES)
    query_timeout_s: float = 600.0  # a query waiting longer for its answer gets 503
    max_upload_bytes: int = MAX_VOLUME_BYTES  # one volume upload
    volume_memory_bytes: int = 2 * MAX_VOLUME_BYTES  # all uploaded volumes together (least recently used go)
    volume_ttl_s: float = 3600.0  # a volume unused this long is dropped
    job_ttl_s: float = 3600.0  # a finished sweep's answers stay readable this long

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_sweeps", "max_bodies", "max_upload_bytes", "volume_memory_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ServiceLimits.{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("query_timeout_s", "volume_ttl_s", "job_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServiceLimits.{name} must be > 0 seconds, got {getattr(self, name)!r}")


def server_version() -> str:
    try:
        return metadata.version("minigpt-pancreas")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@dataclass
class Service:
    worker: EngineWorker
    auth: BearerAuth
    limits: ServiceLimits
    engine_calls: EngineCalls
    device_hint: str = "unknown"  # reported by /healthz while the model loads
    tasks: tuple[p.TaskInfo, ...] = ()  # what /api/v1/info offers
    server_version: str = field(default_factory=server_version)
    volumes: VolumeStore = field(init=False)
    jobs: JobStore = field(init=False)
    bodies: BodySlots = field(init=False)

    def __post_init__(self) -> None:
        self.volumes = VolumeStore(self.limits.volume_memory_bytes, self.limits.volume_ttl_s)
        self.jobs = JobStore(self.limits.job_ttl_s)
        self.bodies = BodySlots(self.limits.max_bodies)

    @property
    def example_prompts(self) -> tuple[str, ...]:
        """Every task's prompts, in order: what servers before API 1.2 offered instead of tasks."""
        return tuple(prompt for task in self.tasks for prompt in task.prompts)

    def begin_shutdown(self, grace_s: float) -> None:
        """Take no more work, cancel every sweep, and answer what still waits within `grace_s` (server.py)."""
        self.worker.begin_shutdown(grace_s)
        self.jobs.cancel_all("the server shut down")

    def ready_engine(self) -> Any:
        """The loaded engine, for its description; else the worker's WorkerUnavailableError (503: loading, or
        "model_unavailable" when loading failed)."""
        if self.worker.engine is None:
            self.worker.check_available()  # raises, unless the engine was set (with state "ok") meanwhile
        return self.worker.engine
