"""Synthetic abdominal CT phantoms (numpy only).

A phantom is a patient built from analytic shapes in physical space (RAS millimetres, drawn from the seed by
`phantom_anatomy`: body wall, spine, liver, spleen, kidneys, pancreas and tumour, aorta, IVC, duodenum and bowel,
and the unlabelled structures round the gland of `phantom_structures`: peripancreatic vessels, stomach, psoas,
ribs, gallbladder, colon) and then sampled at the centre of every voxel of a grid. The grid can be stored in any
axis-aligned orientation, with anisotropic spacing and any origin; because the anatomy lives in physical space,
the same seed gives the same patient (same organs at the same millimetres) whatever the grid.
`sample_scan_parameters(seed)` draws a realistic, varied grid for a seed (matrix, field of view, slice
thickness, z range, orientation, noise): `make_phantom(seed, **sample_scan_parameters(seed))`.

Orientation codes name, for the storage axes +i, +j, +k in that order, the patient direction each axis points
TOWARD (the DICOM/LPS and nibabel "axcodes" convention; ITK's SpatialOrientation names are the opposite):
"LPS" = +i toward the patient's Left, +j toward Posterior, +k toward Superior (DICOM-like);
"RAS" = +i toward Right, +j toward Anterior, +k toward Superior (NIfTI-like); "LAS" (rows flipped);
"RPI" (inferior-first); "ASL" = +i Anterior, +j Superior, +k Left (sagittal slices); "LSP" = +i Left,
+j Superior, +k Posterior (coronal slices). Any code with one letter of each pair L/R, A/P, S/I is accepted.

Arrays are indexed [k, j, i]; `ijk_to_ras` maps homogeneous (i, j, k, 1) to RAS mm (RAS: +x = patient Right,
+y = Anterior, +z = Superior; so the liver, on the patient's right, has RAS x > 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from SlicerMiniGPTPancreas.errors import UserError
from SlicerMiniGPTPancreas.geometry import LPS_TO_RAS
# The label values name the contents of Phantom's label maps, so they are part of this module's interface.
from SlicerMiniGPTPancreas.phantom_anatomy import (  # noqa: F401
    KIDNEY_LEFT, KIDNEY_RIGHT, KIDNEYS, LIVER, MSD_PANCREAS, MSD_TUMOUR, PANCREAS, SPLEEN, Anatomy, draw_anatomy,
    render_anatomy,
)

__all__ = [
    "ORIENTATIONS", "FOV_CENTRE_RAS", "MAX_SCAN_VOXELS", "PhantomError", "Phantom", "make_phantom", "reorient",
    "direction_lps", "sample_scan_parameters", "sample_noise_hu", "LIVER", "KIDNEYS", "SPLEEN", "PANCREAS",
    "MSD_PANCREAS", "MSD_TUMOUR", "KIDNEY_RIGHT", "KIDNEY_LEFT",
]

ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "ASL", "LSP")
# Default field-of-view centre in RAS mm: scanner-like and deliberately non-zero, so that code which ignores
# the origin gets caught by tests.
FOV_CENTRE_RAS = (0.0, 20.0, -180.0)
HU_RANGE = (-1024, 3071)  # the 12-bit CT range; noisy air is clipped at the floor like a real scanner's
_VOXELS_PER_CHUNK = 2_000_000  # bounds the float temporaries of one rendering pass
MAX_SCAN_VOXELS = 512 * 512 * 60  # `sample_scan_parameters` keeps volumes this small, so they render in seconds
_MAX_FOV_MM = 500.0  # widest reconstruction field of view of clinical scanners
_Z_MARGIN_MM = 15.0  # tissue kept above and below the pancreas in a sampled scan

# Letter -> (patient axis 0=x/L-R 1=y/P-A 2=z/S-I, sign in LPS)
_LETTER_LPS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


class PhantomError(UserError, ValueError):
    """A phantom was asked for with impossible parameters (the message says which and what is allowed)."""


def _check_orientation(code: str) -> str:
    if not isinstance(code, str) or len(code) != 3 or any(c not in _LETTER_LPS for c in code.upper()):
        raise PhantomError(f"orientation {code!r} is not a 3-letter code of L/R, A/P, S/I; use one of {ORIENTATIONS}")
    code = code.upper()
    if sorted(_LETTER_LPS[c][0] for c in code) != [0, 1, 2]:
        raise PhantomError(f"orientation {code!r} names a patient axis twice; use one of {ORIENTATIONS}")
    return code


def direction_lps(orientation: str) -> np.ndarray:
    """3x3 direction matrix in LPS whose columns are the unit vectors of +i, +j, +k (SimpleITK's direction)."""
    direction = np.zeros((3, 3))
    for storage_axis, letter in enumerate(_check_orientation(orientation)):
        patient_axis, sign = _LETTER_LPS[letter]
        direction[patient_axis, storage_axis] = sign
    return direction


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic CT volume. Arrays are [k, j, i]; geometry is `ijk_to_ras` (4x4, RAS mm)."""

    hu: np.ndarray            # int16 [K, J, I] Hounsfield units, noise included
    labels: np.ndarray        # uint8 [K, J, I] MSD Task07: 0 background, 1 pancreas, 2 tumour
    organs: np.ndarray        # uint8 [K, J, I] AbdomenCT-1K: 1 liver, 2 kidneys, 3 spleen, 4 pancreas (+tumour)
    kidney_sides: np.ndarray  # uint8 [K, J, I] 0 none, KIDNEY_RIGHT (patient right), KIDNEY_LEFT
    ijk_to_ras: np.ndarray    # float64 [4, 4]
    orientation: str
    seed: int
    anatomy: Anatomy          # the drawn shapes in RAS mm (ground truth for tests)
    has_tumour: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (K, J, I)."""
        return tuple(self.hu.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (i, j, k)."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def origin_ras(self) -> np.ndarray:
        """RAS mm of the centre of voxel (i, j, k) = (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map index points [N, 3] (i, j, k order) to RAS mm [N, 3]."""
        ijk = np.asarray(ijk, dtype=float).reshape(-1, 3)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]


def _ijk_to_ras(orientation: str, spacing: np.ndarray, origin_ras: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction_lps(orientation) * spacing  # scales column a by spacing[a]
    matrix[:3, 3] = origin_ras
    return matrix


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _positive_triple(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.shape != (3,) or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise PhantomError(f"{name} must be three positive finite millimetre values, got {value!r}")
    return array


def make_phantom(seed: int = 0, *, size_mm=(288.0, 288.0, 200.0), spacing=(3.0, 3.0, 5.0), tumour: bool = True,
                 orientation: str = "LPS", origin=None, noise_hu: float = 12.0) -> Phantom:
    """Build a seeded synthetic abdominal CT (`sample_scan_parameters(seed)` gives a realistic, varied grid).

    size_mm: field of view along the PATIENT axes (left-right, anterior-posterior, superior-inferior).
    spacing: voxel size along the STORAGE axes (i, j, k) = (col, row, slice); the grid has
        round(size / spacing) voxels along each storage axis.
    origin: RAS mm of voxel (0, 0, 0)'s centre; None centres the grid on FOV_CENTRE_RAS.
    tumour: add a hypo-attenuating mass inside the pancreas (MSD label 2). The anatomy does not depend on it.
    noise_hu: standard deviation of the Gaussian noise (0 gives noise-free HU; `sample_noise_hu` draws one).
    """
    seed = _check_seed(seed)
    orientation = _check_orientation(orientation)
    size = _positive_triple("size_mm", size_mm)
    spacing_ijk = _positive_triple("spacing", spacing)
    if not np.isfinite(noise_hu) or noise_hu < 0:
        raise PhantomError(f"noise_hu must be a finite value >= 0, got {noise_hu!r}")
    counts = _grid_counts(orientation, size, spacing_ijk)
    if origin is None:
        origin_ras = _centred_origin(orientation, spacing_ijk, counts, FOV_CENTRE_RAS)
    else:
        origin_ras = np.asarray(origin, dtype=float)
        if origin_ras.shape != (3,) or not np.all(np.isfinite(origin_ras)):
            raise PhantomError(f"origin must be three finite RAS millimetre values, got {origin!r}")
    ijk_to_ras = _ijk_to_ras(orientation, spacing_ijk, origin_ras)

    anatomy = draw_anatomy(seed, np.asarray(FOV_CENTRE_RAS))
    hu, labels, organs, sides = _render(anatomy, ijk_to_ras, counts, tumour)
    if noise_hu > 0:
        noise_rng = np.random.default_rng((seed, 1))  # its own stream: anatomy draws never depend on it
        hu += noise_rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    hu_int16 = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    return Phantom(hu_int16, labels, organs, sides, ijk_to_ras, orientation, seed, anatomy, bool(tumour))


def _grid_counts(orientation: str, size_mm: np.ndarray, spacing_ijk: np.ndarray) -> np.ndarray:
    """Voxels along (i, j, k): the patient-axis field of view over the storage-axis spacing."""
    patient_axis = [_LETTER_LPS[letter][0] for letter in orientation]
    return np.maximum(1, np.rint(size_mm[patient_axis] / spacing_ijk)).astype(int)


def _centred_origin(orientation: str, spacing_ijk: np.ndarray, counts: np.ndarray, centre_ras) -> np.ndarray:
    """RAS mm of voxel (0, 0, 0) for a grid whose middle lies on `centre_ras`."""
    direction_ras = LPS_TO_RAS @ direction_lps(orientation)
    return np.asarray(centre_ras, float) - direction_ras @ (spacing_ijk * (counts - 1) / 2.0)


def sample_noise_hu(seed: int) -> float:
    """Noise standard deviation (HU) of a realistic scan of patient `seed`: 5 (thick, high-dose) to 25 HU."""
    return float(np.random.default_rng((_check_seed(seed), 3)).uniform(5.0, 25.0))


def sample_scan_parameters(seed: int) -> dict:
    """Draw a realistic, varied scan of patient `seed`, as keyword arguments of `make_phantom`.

    Use as `make_phantom(seed, **sample_scan_parameters(seed))`; the same seed always gives the same scan.
    The returned dict has `size_mm` (LR, AP, SI field of view), `spacing` (along the storage axes i, j, k of
    `orientation`), `orientation`, `origin` and `noise_hu`:
    - in-plane matrix of 160-512 columns with square pixels; 60 % of scans have as many rows, the others fewer
      (at least 160, and enough for the body's depth);
    - field of view such that the body fills 50-90 % of the frame width (at most 500 mm, as on scanners),
      centred on FOV_CENTRE_RAS unless that would cut the body: the frame then moves just enough to hold it;
    - slice thickness 1.5-5 mm, thicker where needed to stay under MAX_SCAN_VOXELS; z extent 120-220 mm
      holding the whole pancreas with at least 15 mm to spare on either side;
    - orientation drawn uniformly from ORIENTATIONS; noise from `sample_noise_hu`.
    """
    seed = _check_seed(seed)
    rng = np.random.default_rng((seed, 2))  # its own stream: the patient's draws never depend on the scan's
    anatomy = draw_anatomy(seed, np.asarray(FOV_CENTRE_RAS))
    body_half = np.array(anatomy.body.semi[:2])  # LR, AP half-axes of the skin
    columns = int(rng.integers(160, 513))
    fill = rng.uniform(max(0.5, 2.0 * body_half[0] / _MAX_FOV_MM), 0.9)
    pixel = 2.0 * body_half[0] / fill / columns
    min_rows = max(160, int(np.ceil(2.0 * body_half[1] / pixel)) + 4)  # 2 px of air in front and behind
    square = rng.random() < 0.6 or min_rows >= columns
    rows = columns if square else int(rng.integers(min_rows, columns + 1))
    thickness, slices, z_centre = _draw_slices(rng, anatomy, columns * rows)
    fov = np.array([columns * pixel, rows * pixel, slices * thickness])
    slack = np.maximum(0.0, fov[:2] / 2.0 - body_half - 2.0 * pixel)  # how far the frame may sit off the body
    body_centre = np.array(anatomy.body.centre[:2])
    centre = [*np.clip(FOV_CENTRE_RAS[:2], body_centre - slack, body_centre + slack), z_centre]
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    # In-plane pixel along the LR and AP patient axes, slice thickness along SI, whichever storage axis that is.
    spacing = np.array([(pixel, pixel, thickness)[_LETTER_LPS[letter][0]] for letter in orientation])
    origin = _centred_origin(orientation, spacing, _grid_counts(orientation, fov, spacing), centre)
    return dict(size_mm=tuple(float(v) for v in fov), spacing=tuple(float(v) for v in spacing),
                orientation=orientation, origin=tuple(float(v) for v in origin), noise_hu=sample_noise_hu(seed))


def _draw_slices(rng: np.random.Generator, anatomy: Anatomy, pixels_per_slice: int) -> tuple[float, int, float]:
    """Slice thickness, slice count and z centre (RAS mm) of a stack that holds the whole pancreas."""
    low = min(part.centre[2] - part.semi[2] for part in anatomy.pancreas) - _Z_MARGIN_MM
    high = max(part.centre[2] + part.semi[2] for part in anatomy.pancreas) + _Z_MARGIN_MM
    extent = max(rng.uniform(120.0, 220.0), high - low)
    thickness = rng.uniform(1.5, 5.0)
    thickness = min(5.0, max(thickness, extent / (MAX_SCAN_VOXELS // pixels_per_slice)))
    slices = int(np.ceil(extent / thickness - 1e-9))
    extent = slices * thickness
    return thickness, slices, rng.uniform(high - extent / 2.0, low + extent / 2.0)


def _render(anatomy: Anatomy, ijk_to_ras: np.ndarray, counts: np.ndarray, tumour: bool):
    """Sample the anatomy at every voxel centre, a slab of k at a time to bound memory."""
    n_i, n_j, n_k = (int(c) for c in counts)
    hu = np.empty((n_k, n_j, n_i), np.float32)
    labels, organs, sides = (np.empty((n_k, n_j, n_i), np.uint8) for _ in range(3))
    # Each RAS coordinate depends on one storage axis only (axis-aligned grid), so build it as a 1D array
    # shaped to broadcast over [k, j, i].
    index_1d = [np.arange(n_i).reshape(1, 1, -1), np.arange(n_j).reshape(1, -1, 1), np.arange(n_k).reshape(-1, 1, 1)]
    coords = []
    for ras_axis in range(3):
        axis = int(np.argmax(np.abs(ijk_to_ras[ras_axis, :3])))
        coords.append(ijk_to_ras[ras_axis, 3] + ijk_to_ras[ras_axis, axis] * index_1d[axis])
    slab = max(1, _VOXELS_PER_CHUNK // (n_i * n_j))
    for k0 in range(0, n_k, slab):
        part = [c[k0:k0 + slab] if c.shape[0] > 1 else c for c in coords]
        chunk = slice(k0, k0 + slab)
        hu[chunk], labels[chunk], organs[chunk], sides[chunk] = render_anatomy(anatomy, *part, tumour=tumour)
    return hu, labels, organs, sides


def reorient(phantom: Phantom, orientation: str) -> Phantom:
    """Re-store the same voxels in another axis-aligned orientation (transpose + flips, no interpolation)."""
    target = _check_orientation(orientation)
    source_direction = direction_lps(phantom.orientation)
    target_direction = direction_lps(target)
    # change[s, t] = +-1 where target axis t runs along source axis s.
    change = np.rint(source_direction.T @ target_direction).astype(int)
    source_axis_of = [int(np.flatnonzero(change[:, t])[0]) for t in range(3)]
    flipped = [change[source_axis_of[t], t] < 0 for t in range(3)]
    counts = phantom.hu.shape[::-1]  # (I, J, K)

    def restore(array: np.ndarray) -> np.ndarray:
        # numpy axis of storage axis a is 2 - a; result is [k', j', i'].
        moved = np.transpose(array, [2 - source_axis_of[t] for t in (2, 1, 0)])
        flips = tuple(2 - t for t in range(3) if flipped[t])
        return np.ascontiguousarray(np.flip(moved, axis=flips) if flips else moved)

    old = phantom.ijk_to_ras
    new = np.eye(4)
    new[:3, 3] = old[:3, 3]
    for t, s in enumerate(source_axis_of):
        new[:3, t] = old[:3, s] * (-1.0 if flipped[t] else 1.0)
        if flipped[t]:
            new[:3, 3] += old[:3, s] * (counts[s] - 1)  # new index 0 is the old last voxel along s
    return Phantom(restore(phantom.hu), restore(phantom.labels), restore(phantom.organs),
                   restore(phantom.kidney_sides), new, target, phantom.seed, phantom.anatomy, phantom.has_tumour)
