"""Files the real dataset archives hold that no reader should trust, written for the error-path tests:
macOS AppleDouble `._*` members beside the MSD cases, and a `.nii.gz` cut off mid-stream."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from SlicerMiniGPTPancreas.atomic import atomic_write_bytes

# The first bytes of a macOS AppleDouble file (magic 0x00051607, version 2, "Mac OS X" filler, 2 entries):
# what the `._*` members of the MSD tar start with. Padded to 4 KiB with zeros like the real ones.
APPLE_DOUBLE_HEADER = bytes.fromhex("00051607" "00020000") + b"Mac OS X        " + bytes.fromhex("0002")


def write_apple_doubles(msd_task: Path) -> list[Path]:
    """Beside every case of an MSD task folder (write_msd's), the `._pancreas_XXX.nii.gz` the real archive
    holds, in imagesTr and labelsTr; return the paths written."""
    junk = APPLE_DOUBLE_HEADER.ljust(4096, b"\0")
    cases = [case for folder in ("imagesTr", "labelsTr")
             for case in sorted((Path(msd_task) / folder).glob("pancreas_*.nii.gz"))]
    return [atomic_write_bytes(case.with_name(f"._{case.name}"), junk) for case in cases]


def write_corrupt_file(path) -> Path:
    """Write a truncated `.nii.gz` (a valid gzip start, cut mid-stream) at `path`."""
    path = Path(path)
    header = b"\x5c\x01\x00\x00" + bytes(344)  # a NIfTI-1 sizeof_hdr of 348, the rest missing
    compressed = gzip.compress(header + np.arange(4096, dtype=np.int16).tobytes())
    atomic_write_bytes(path, compressed[: len(compressed) // 2])
    return path
