"""Uploaded volumes, kept in memory for sweeps: a byte cap (least recently used go first) and an idle expiry.

A volume is a read-only model-view array [S, R, C] int16 with its (col, row, slice) spacing. A sweep holds its own
reference while it runs, so evicting a volume never breaks a running sweep; it only stops new sweeps from naming it.

An upload reserves its bytes (`reserve`) before its body is read, so stored volumes and uploads in progress
together never exceed the capacity: older volumes make room first, and when uploads in progress alone fill it,
the next one is answered 503.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from SlicerMiniGPTPancreas import protocol as p
from SlicerMiniGPTPancreas.validation import excerpt

from .errors import ApiError, busy


@dataclass(frozen=True)
class StoredVolume:
    volume_id: str
    array: np.ndarray  # [S, R, C] int16 HU, model view
    spacing_mm: tuple[float, float, float]  # (col, row, slice)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def model_view_of_scan(array_kji: np.ndarray, ijk_to_ras: np.ndarray,
                       resample: bool) -> tuple[np.ndarray, tuple[float, float, float], bool]:
    """A volume uploaded as stored -> (model-view array [S, R, C], (col, row, slice) spacing, resampled). A tilted
    volume is resampled onto its nearest axial grid with `resample`, and refused (422) naming the option without."""
    from SlicerMiniGPTPancreas import geometry

    resampled = False
    try:
        view = geometry.ModelView.from_volume(array_kji, ijk_to_ras)
    except geometry.ObliqueVolumeError as error:
        if not resample:
            raise ApiError(p.ErrorCode.VALIDATION,
                           f"{error} Or upload it again with resample=true (the client's upload_scan(..., "
                           "resample=True); the Slicer module's resample_tilted option): the server then resamples "
                           "it onto the nearest axial grid and says so in the reply (resampled).") from None
        view = geometry.ModelView.from_volume(*geometry.resample_volume_to_axial(array_kji, ijk_to_ras))
        resampled = True
    array = np.ascontiguousarray(view.array, dtype=np.int16)
    array.flags.writeable = False
    return array, view.spacing, resampled


@dataclass
class Reservation:
    """Bytes an upload in progress holds in a VolumeStore; given back when its `with` block ends."""

    store: VolumeStore
    n_bytes: int

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.store.release(self.n_bytes)


class VolumeStore:
    """Thread-safe map volume_id -> StoredVolume with a total byte cap and an idle time-to-live."""

    def __init__(self, capacity_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._volumes: OrderedDict[str, tuple[StoredVolume, float]] = OrderedDict()  # least recently used first
        self._reserved = 0  # bytes of uploads in progress
        self._lock = threading.Lock()

    def reserve(self, n_bytes: int) -> Reservation:
        """Room for an upload of `n_bytes` while it is read and stored: 413 above the capacity, 503 while other
        uploads in progress hold the room it needs. `add` the volume inside the reservation's `with` block."""
        self._check_fits(n_bytes)
        with self._lock:
            self._expire()
            self._make_room(n_bytes)
            if self._used() + self._reserved + n_bytes > self.capacity_bytes:
                raise busy(f"other uploads in progress fill this server's {self.capacity_bytes} bytes of volume "
                           "memory; try again when they are done", 5)
            self._reserved += n_bytes
        return Reservation(self, n_bytes)

    def release(self, n_bytes: int) -> None:
        with self._lock:
            self._reserved -= n_bytes

    def add(self, array: np.ndarray, spacing_mm: tuple[float, ...], *, reserved: bool = False) -> StoredVolume:
        """Keep `array`, evicting expired and then least recently used volumes to make room (`reserved`: inside
        the `reserve` block of its upload, whose bytes then count once)."""
        self._check_fits(array.nbytes)
        volume = StoredVolume(secrets.token_urlsafe(12), array, tuple(spacing_mm))  # 16 URL-safe characters
        with self._lock:
            self._expire()
            self._make_room(0 if reserved else volume.nbytes)
            self._volumes[volume.volume_id] = (volume, self._clock())
        return volume

    def get(self, volume_id: str) -> StoredVolume:
        """The volume, marked as just used; 404 "not_found" when unknown or expired."""
        with self._lock:
            self._expire()
            entry = self._volumes.get(volume_id)
            if entry is None:
                raise ApiError(p.ErrorCode.NOT_FOUND,
                               f"no volume {excerpt(volume_id)} on this server: it was never uploaded, expired after "
                               f"{self.ttl_s:g} s unused, made room for newer uploads, or the server restarted")
            self._volumes[volume_id] = (entry[0], self._clock())
            self._volumes.move_to_end(volume_id)
            return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._volumes.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._volumes)

    def _check_fits(self, n_bytes: int) -> None:
        if n_bytes > self.capacity_bytes:
            raise ApiError(p.ErrorCode.PAYLOAD_TOO_LARGE,
                           f"the volume has {n_bytes} bytes but this server keeps at most {self.capacity_bytes} "
                           "bytes of volumes; send a slice range (crop the volume) or restart the server with a "
                           "larger --volume-memory")

    def _make_room(self, n_bytes: int) -> None:
        """Evict least recently used volumes until `n_bytes` more fit beside the stored and reserved ones."""
        while self._volumes and self._used() + self._reserved + n_bytes > self.capacity_bytes:
            self._volumes.popitem(last=False)

    def _used(self) -> int:
        return sum(volume.nbytes for volume, _ in self._volumes.values())

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for volume_id in [key for key, (_, used) in self._volumes.items() if used < deadline]:
            del self._volumes[volume_id]
