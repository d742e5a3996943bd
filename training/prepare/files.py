"""Shared plumbing of `prepare`: its error types, problem reports and atomic file writes.

Every file `prepare` writes appears whole or not at all (`SlicerMiniGPTPancreas.atomic`): it is written to a
hidden temporary name in the same folder and renamed over the target. An interrupted run therefore leaves only
finished files (plus, after a hard kill, stray `.tmp-*` files), which is what makes resuming safe. A write that
fails (no permission, disk full, a file where a folder should be) raises an `OutputError` naming the path.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes
from SlicerMiniGPTPancreas.errors import UserError, write_errors_as

DATASETS = ("nih", "msd", "abdomenct1k")
# The `dataset` value upstream writes into its records, by our dataset name.
UPSTREAM_DATASET = {"nih": "NIH", "msd": "MSD", "abdomenct1k": "ABD"}


class PrepareError(UserError, ValueError):
    """A user error that stops `prepare` before it starts (bad root, bad option, output inside an input)."""


class VolumeError(UserError, ValueError):
    """One volume cannot be prepared (missing, corrupt or inconsistent file); the run goes on without it."""


class OutputError(UserError):
    """The output folder cannot be written: no permission, a full disk, a file where a folder should be."""


def writing(path: str | os.PathLike):
    """Turn an OSError while writing `path` into an OutputError that names it and says what to do."""
    return write_errors_as(OutputError, path, "finished volumes are kept, so the same command resumes.")


@dataclass(frozen=True)
class Problem:
    """Why one volume was not prepared. `path` is its image (file or DICOM folder); `message` names the
    offending file when that is another one (a label, one DICOM slice)."""

    dataset: str
    volume: str
    path: str
    message: str

    def line(self) -> str:
        """One human-readable line."""
        return f"{self.dataset}/{self.volume}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def atomic_write_json(path: str | os.PathLike, payload: Any, only_if_changed: bool = False) -> None:
    """Write `payload` as UTF-8 JSON, atomically: a list one item per line (records, task entries), else indented."""
    if isinstance(payload, list):
        text = "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in payload) + "\n]" if payload else "[]"
    else:
        text = json.dumps(payload, indent=1, ensure_ascii=False)
    with writing(path):
        atomic_write_bytes(path, (text + "\n").encode("utf-8"), only_if_changed)


def read_json(path: str | os.PathLike) -> Any:
    """Load one JSON file written by `atomic_write_json`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def atomic_save_png(path: str | os.PathLike, rgb: np.ndarray, only_if_changed: bool = False) -> None:
    """Save a uint8 [R, C, 3] image as an 8-bit RGB PNG, atomically (Pillow infers RGB from the shape)."""
    from PIL import Image  # lazy: the CLI's --help must not pay for it

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    with writing(path):
        atomic_write_bytes(path, buffer.getvalue(), only_if_changed)


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `path` is `folder` or lies below it (symbolic links resolved)."""
    resolved, base = Path(path).resolve(), Path(folder).resolve()
    return resolved == base or base in resolved.parents
