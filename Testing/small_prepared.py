"""A small `prepare` output (two MSD phantoms, one train and one test volume) for fit and evaluate tests."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from SlicerMiniGPTPancreas.phantom import make_phantom
from SlicerMiniGPTPancreas.phantom_writers import write_msd
from training.cli import main


def prepare_small_msd(base: Path) -> Path:
    """Write two small MSD phantoms under `base` and prepare them; returns the prepare output folder."""
    write_msd(base / "msd", [make_phantom(seed, size_mm=(150.0, 120.0, 80.0), spacing=(3.0, 4.0, 5.0))
                             for seed in (1, 2)])
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["prepare", "--dataset", "msd", "--root", str(base / "msd"), "--out", str(base / "out"),
                     "--threshold", "0.1", "--test-ratio", "0.5", "--workers", "1", "--quiet"]) == 0
    return base / "out"
