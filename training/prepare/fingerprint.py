"""Content hashes and a coarse signature of a volume, for finding the same scan in two datasets.

AbdomenCT-1K re-distributes NIH Pancreas-CT and MSD scans, possibly in another file orientation, file format
or data type. Both fingerprints are therefore taken on the model view (orientation-free) after rounding HU
to int16:
- exact duplicate: equal `volume_hash` = sha256 of the model-view shape and spacing (0.001 mm) followed by the
  int16 HU bytes of every slice in model-view order;
- near duplicate: same model-view shape, spacing within 0.01 mm, and block means of HU (the volume cut
  into 8 x 8 x 8 blocks) all within 2 HU; this catches re-encodings that change a few voxels by rounding,
  not crops, resampling or re-windowing;
- shared slices: `slice_signatures`, one per slice, the sha256 (16 hex digits) of the slice's int16 HU minus
  the slice's minimum, with its shape. It survives a crop (a copy cut by a slice at each end keeps the other
  slices' signatures) and a stored-value offset (a wrong rescale intercept shifts every voxel alike). Slices
  that are (almost) one value, like padding, say nothing about the scan and get None.
`slice_hash` (per record `content_hash`) is the sha256 of one slice's int16 HU bytes and shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SIGNATURE_BLOCKS = 8
NEAR_DUPLICATE_HU = 2.0
NEAR_DUPLICATE_SPACING_MM = 0.01
INFORMATIVE_FRACTION = 0.01  # a slice with fewer voxels off its minimum (padding, air) gets no signature


@dataclass
class Fingerprint:
    """A volume's hashes (hex sha256) and its coarse signature."""

    volume_hash: str
    slice_hashes: list[str]  # one per model-view slice
    signature: list[float]  # [8 * 8 * 8] block means of HU, slice-block major (fewer blocks on axes < 8)
    slice_signatures: list[str | None]  # one per model-view slice: offset-invariant content, None if uninformative


def fingerprint(view_hu: np.ndarray, spacing: tuple[float, float, float]) -> Fingerprint:
    """Fingerprint a model-view HU array [S, R, C] with its (col, row, slice) spacing in mm."""
    slice_count, rows, columns = view_hu.shape
    header = f"{slice_count}x{rows}x{columns}|" + ",".join(f"{value:.3f}" for value in spacing)
    volume = hashlib.sha256(header.encode("ascii"))
    row_starts = _block_starts(rows)
    column_starts = _block_starts(columns)
    slice_block = np.minimum(np.arange(slice_count) * SIGNATURE_BLOCKS // slice_count, SIGNATURE_BLOCKS - 1)
    block_sums = np.zeros((SIGNATURE_BLOCKS, len(row_starts), len(column_starts)))
    block_counts = np.zeros_like(block_sums)
    slice_hashes, slice_signatures = [], []
    for s in range(slice_count):
        hu = _as_int16(view_hu[s])  # [R, C] C-contiguous
        data = hu.tobytes()
        volume.update(data)
        slice_hashes.append(hashlib.sha256(f"{rows}x{columns}|".encode("ascii") + data).hexdigest())
        slice_signatures.append(slice_signature(hu))
        sums = np.add.reduceat(np.add.reduceat(hu.astype(np.float64), row_starts, axis=0), column_starts, axis=1)
        block_sums[slice_block[s]] += sums
        block_counts[slice_block[s]] += np.outer(np.diff(row_starts, append=rows), np.diff(column_starts,
                                                                                          append=columns))
    means = np.divide(block_sums, block_counts, out=np.zeros_like(block_sums), where=block_counts > 0)
    return Fingerprint(volume.hexdigest(), slice_hashes, [round(float(v), 2) for v in means.ravel()],
                       slice_signatures)


def slice_signature(hu: np.ndarray) -> str | None:
    """Offset-invariant content signature of an int16 HU slice [R, C]; None for a slice of (almost) one value."""
    lowest = int(hu.min())
    if np.count_nonzero(hu != lowest) < INFORMATIVE_FRACTION * hu.size:
        return None
    shifted = hu.astype(np.int32) - lowest  # int32: the shift of an int16 range does not fit int16
    return hashlib.sha256(f"{hu.shape[0]}x{hu.shape[1]}|".encode("ascii") + shifted.tobytes()).hexdigest()[:16]


def is_near_duplicate(a: dict, b: dict) -> bool:
    """True for two volume metadata dicts (`shape`, `spacing`, `signature`) of the same scan (see module doc)."""
    if a["shape"] != b["shape"]:
        return False
    if np.max(np.abs(np.subtract(a["spacing"], b["spacing"]))) > NEAR_DUPLICATE_SPACING_MM:
        return False
    return bool(np.max(np.abs(np.subtract(a["signature"], b["signature"]))) <= NEAR_DUPLICATE_HU)


def _block_starts(size: int) -> np.ndarray:
    """Start indices of up to 8 near-equal blocks along an axis of `size` (fewer if the axis is shorter)."""
    return np.unique(np.arange(SIGNATURE_BLOCKS) * size // SIGNATURE_BLOCKS)


def _as_int16(slice_hu: np.ndarray) -> np.ndarray:
    if slice_hu.dtype == np.int16:
        return np.ascontiguousarray(slice_hu)
    return np.clip(np.rint(slice_hu), -32768, 32767).astype(np.int16)
