"""Synthetic abdominal CT phantoms (numpy only).

A phantom is a patient built from analytic shapes in physical space (RAS millimetres) and then sampled at the
centre of every voxel of a grid. The grid can be stored in any axis-aligned orientation, with anisotropic
spacing and any origin; because the anatomy lives in physical space, the same seed gives the same patient
(same organs at the same millimetres) whatever the grid.

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

from SlicerMiniGPTPancreas.geometry import LPS_TO_RAS

__all__ = [
    "ORIENTATIONS", "FOV_CENTRE_RAS", "PhantomError", "Phantom", "make_phantom", "reorient",
    "direction_lps", "Anatomy", "Ellipsoid", "NOMINAL_HU", "LIVER", "KIDNEYS", "SPLEEN", "PANCREAS",
    "MSD_PANCREAS", "MSD_TUMOUR", "KIDNEY_RIGHT", "KIDNEY_LEFT",
]

ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "ASL", "LSP")
# Default field-of-view centre in RAS mm: scanner-like and deliberately non-zero, so that code which ignores
# the origin gets caught by tests.
FOV_CENTRE_RAS = (0.0, 20.0, -180.0)
HU_RANGE = (-1024, 3071)  # the 12-bit CT range; noisy air is clipped at the floor like a real scanner's
_VOXELS_PER_CHUNK = 2_000_000  # bounds the float temporaries of one rendering pass

# Letter -> (patient axis 0=x/L-R 1=y/P-A 2=z/S-I, sign in LPS)
_LETTER_LPS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# AbdomenCT-1K organ ids, MSD Task07 label values, and the values of `Phantom.kidney_sides`.
LIVER, KIDNEYS, SPLEEN, PANCREAS = 1, 2, 3, 4
MSD_PANCREAS, MSD_TUMOUR = 1, 2
KIDNEY_RIGHT, KIDNEY_LEFT = 1, 2
NOMINAL_HU = {
    "air": -1000.0, "subcutaneous_fat": -100.0, "muscle": 50.0, "visceral_fat": -90.0, "bone": 700.0,
    "liver": 60.0, "spleen": 50.0, "kidney_cortex": 150.0, "kidney_medulla": 40.0, "aorta": 200.0,
    "ivc": 130.0, "duodenum": 25.0, "pancreas": 100.0, "tumour": 30.0,
}
_PANCREAS_SAMPLES = 24  # ellipsoids along the head -> body -> tail curve


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in RAS mm; an infinite z semi-axis makes a vertical elliptic cylinder."""

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (broadcast x, y, z in RAS mm) inside the ellipsoid."""
        (cx, cy, cz), (a, b, c) = self.centre, self.semi
        return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2 <= 1.0


@dataclass(frozen=True)
class Anatomy:
    """The drawn patient: shapes in RAS mm and the tissue HU (before noise)."""

    body: Ellipsoid     # skin surface
    muscle: Ellipsoid   # outer surface of the abdominal wall muscle (inside the subcutaneous fat)
    cavity: Ellipsoid   # inner surface of the wall: organs are clipped to it
    vertebra: Ellipsoid
    spinous: Ellipsoid
    liver: Ellipsoid
    spleen: Ellipsoid
    kidneys: dict[int, tuple[Ellipsoid, Ellipsoid]]  # KIDNEY_RIGHT / KIDNEY_LEFT -> (cortex surface, medulla)
    aorta: Ellipsoid
    ivc: Ellipsoid
    duodenum: Ellipsoid
    pancreas: tuple[Ellipsoid, ...]  # Ellipsoids from head (patient right) through body to tail (toward the spleen)
    tumour: Ellipsoid   # clipped to the pancreas when rendered
    hu: dict[str, float]  # tissue name -> HU, NOMINAL_HU jittered by up to 5


def draw_anatomy(seed: int, centre_ras: np.ndarray) -> Anatomy:
    """Draw organ sizes and positions from `seed`; the result does not depend on the voxel grid."""
    rng = np.random.default_rng(seed)

    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    px, py, pz = np.asarray(centre_ras, float) + [jit(8.0), jit(8.0), jit(10.0)]  # patient on the table

    def at(dx: float, dy: float, dz: float) -> tuple[float, float, float]:
        return (px + dx, py + dy, pz + dz)  # RAS: +dx = patient right, +dy = anterior, +dz = superior

    def semi(a: float, b: float, c: float, scale: float = 0.1) -> tuple[float, float, float]:
        factor = 1.0 + jit(scale)
        return (a * factor, b * factor, c * factor)

    half_width, half_depth = 130.0 + jit(6.0), 100.0 + jit(6.0)
    fat, wall = 14.0 + jit(4.0), 12.0 + jit(2.0)
    ai, bi = half_width - fat - wall, half_depth - fat - wall  # cavity half-width and half-depth
    inf = np.inf
    kidneys = {}
    for side, sign, dz in ((KIDNEY_RIGHT, 1.0, -10.0), (KIDNEY_LEFT, -1.0, 0.0)):
        centre = at(sign * 0.5 * ai + jit(4.0), -0.45 * bi + jit(4.0), dz + jit(5.0))
        cortex = semi(22.0, 17.0, 45.0)
        kidneys[side] = (Ellipsoid(centre, cortex), Ellipsoid(centre, (cortex[0] - 8, cortex[1] - 7, cortex[2] - 12)))
    head = np.array(at(30.0 + jit(5.0), 0.0 + jit(4.0), -10.0 + jit(4.0)))
    body = np.array(at(jit(4.0), 12.0 + jit(4.0), -2.0 + jit(3.0)))
    tail = np.array(at(-0.56 * ai + jit(5.0), -8.0 + jit(4.0), 8.0 + jit(4.0)))
    radii = np.array([16.0, 10.0, 8.0]) * (1.0 + jit(0.1))  # head, body, tail
    control = 2.0 * body - (head + tail) / 2.0  # so the quadratic Bezier passes through `body` at t = 0.5
    t = np.linspace(0.0, 1.0, _PANCREAS_SAMPLES)[:, None]
    curve = (1 - t) ** 2 * head + 2 * t * (1 - t) * control + t ** 2 * tail  # [N, 3]
    radius = np.interp(t[:, 0], [0.0, 0.5, 1.0], radii)                    # [N]
    pancreas = tuple(Ellipsoid(tuple(c), (r, r, 0.8 * r)) for c, r in zip(curve, radius))
    t_tumour = rng.uniform(0.1, 0.55)  # head or body, where MSD masses mostly are
    r_local = float(np.interp(t_tumour, [0.0, 0.5, 1.0], radii))
    tumour_centre = ((1 - t_tumour) ** 2 * head + 2 * t_tumour * (1 - t_tumour) * control + t_tumour ** 2 * tail
                     + rng.uniform(-0.2, 0.2, 3) * r_local)
    tumour_radius = rng.uniform(0.45, 0.6) * r_local
    hu = {name: value + (jit(5.0) if name != "air" else 0.0) for name, value in NOMINAL_HU.items()}
    return Anatomy(
        body=Ellipsoid(at(0, 0, 0), (half_width, half_depth, inf)),
        muscle=Ellipsoid(at(0, 0, 0), (half_width - fat, half_depth - fat, inf)),
        cavity=Ellipsoid(at(0, 0, 0), (ai, bi, inf)),
        vertebra=Ellipsoid(at(0, -bi + 22.0, 0), (16.0, 15.0, inf)),
        spinous=Ellipsoid(at(0, -bi - 4.0, 0), (9.0, 16.0, inf)),
        # Liver and spleen reach down to the pancreas level, as on real CT (the right lobe lies lateral to it).
        liver=Ellipsoid(at(0.7 * ai + jit(4.0), 0.1 * bi + jit(5.0), 30.0 + jit(8.0)),
                        semi(0.3 * ai, 0.75 * bi, 60.0)),
        spleen=Ellipsoid(at(-0.68 * ai + jit(4.0), -0.35 * bi + jit(4.0), 20.0 + jit(6.0)),
                         semi(0.2 * ai, 0.35 * bi, 45.0)),
        kidneys=kidneys,
        aorta=Ellipsoid(at(-13.0 + jit(3.0), -bi + 48.0 + jit(2.0), 0), (11.0, 11.0, inf)),
        ivc=Ellipsoid(at(22.0 + jit(3.0), -bi + 48.0 + jit(2.0), 0), (12.0, 9.0, inf)),
        duodenum=Ellipsoid(tuple(head + [radii[0] + 10.0, 0.0, -5.0]), (9.0, 10.0, 35.0)),
        pancreas=pancreas,
        tumour=Ellipsoid(tuple(tumour_centre), (tumour_radius,) * 3),
        hu=hu,
    )


def render_anatomy(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, tumour: bool = True):
    """Paint the anatomy at points (x, y, z broadcastable RAS mm arrays); later structures win.

    Returns (hu float32, labels, organs, kidney_sides uint8), each of the broadcast shape.
    """
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    hu = np.full(shape, anatomy.hu["air"], np.float32)
    labels, organs, sides = (np.zeros(shape, np.uint8) for _ in range(3))

    def inside(shape_: Ellipsoid) -> np.ndarray:
        return np.broadcast_to(shape_.contains(x, y, z), shape)

    def paint(mask: np.ndarray, tissue: str, organ: int = 0, side: int = 0, label: int = 0) -> None:
        hu[mask], organs[mask], sides[mask], labels[mask] = anatomy.hu[tissue], organ, side, label

    paint(inside(anatomy.body), "subcutaneous_fat")
    paint(inside(anatomy.muscle), "muscle")
    cavity = inside(anatomy.cavity)
    paint(cavity, "visceral_fat")
    paint(inside(anatomy.vertebra) | inside(anatomy.spinous), "bone")
    paint(cavity & inside(anatomy.liver), "liver", LIVER)
    paint(cavity & inside(anatomy.spleen), "spleen", SPLEEN)
    for side, (cortex, medulla) in anatomy.kidneys.items():
        paint(cavity & inside(cortex), "kidney_cortex", KIDNEYS, side)
        paint(cavity & inside(medulla), "kidney_medulla", KIDNEYS, side)
    paint(inside(anatomy.aorta), "aorta")
    paint(inside(anatomy.ivc), "ivc")
    paint(cavity & inside(anatomy.duodenum), "duodenum")
    pancreas = np.zeros(shape, bool)
    for part in anatomy.pancreas:
        pancreas |= part.contains(x, y, z)
    pancreas &= cavity
    paint(pancreas, "pancreas", PANCREAS, label=MSD_PANCREAS)
    if tumour:
        paint(pancreas & inside(anatomy.tumour), "tumour", PANCREAS, label=MSD_TUMOUR)
    return hu, labels, organs, sides



class PhantomError(ValueError):
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


def _positive_triple(name: str, value) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.shape != (3,) or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise PhantomError(f"{name} must be three positive finite millimetre values, got {value!r}")
    return array


def make_phantom(seed: int = 0, *, size_mm=(288.0, 288.0, 200.0), spacing=(3.0, 3.0, 5.0), tumour: bool = True,
                 orientation: str = "LPS", origin=None, noise_hu: float = 12.0) -> Phantom:
    """Build a seeded synthetic abdominal CT.

    size_mm: field of view along the PATIENT axes (left-right, anterior-posterior, superior-inferior).
    spacing: voxel size along the STORAGE axes (i, j, k) = (col, row, slice); the grid has
        round(size / spacing) voxels along each storage axis.
    origin: RAS mm of voxel (0, 0, 0)'s centre; None centres the grid on FOV_CENTRE_RAS.
    tumour: add a hypo-attenuating mass inside the pancreas (MSD label 2). The anatomy does not depend on it.
    noise_hu: standard deviation of the Gaussian noise (0 gives noise-free HU).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise PhantomError(f"seed must be a non-negative integer, got {seed!r}")
    orientation = _check_orientation(orientation)
    size = _positive_triple("size_mm", size_mm)
    spacing_ijk = _positive_triple("spacing", spacing)
    if not np.isfinite(noise_hu) or noise_hu < 0:
        raise PhantomError(f"noise_hu must be a finite value >= 0, got {noise_hu!r}")
    patient_axis = [_LETTER_LPS[letter][0] for letter in orientation]
    counts = np.maximum(1, np.rint(size[patient_axis] / spacing_ijk)).astype(int)  # (I, J, K)
    direction_ras = LPS_TO_RAS @ direction_lps(orientation)
    if origin is None:
        origin_ras = np.asarray(FOV_CENTRE_RAS) - direction_ras @ (spacing_ijk * (counts - 1) / 2.0)
    else:
        origin_ras = np.asarray(origin, dtype=float)
        if origin_ras.shape != (3,) or not np.all(np.isfinite(origin_ras)):
            raise PhantomError(f"origin must be three finite RAS millimetre values, got {origin!r}")
    ijk_to_ras = _ijk_to_ras(orientation, spacing_ijk, origin_ras)

    anatomy = draw_anatomy(int(seed), np.asarray(FOV_CENTRE_RAS))
    hu, labels, organs, sides = _render(anatomy, ijk_to_ras, counts, tumour)
    if noise_hu > 0:
        noise_rng = np.random.default_rng((int(seed), 1))  # its own stream: anatomy draws never depend on it
        hu += noise_rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32)
    hu_int16 = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    return Phantom(hu_int16, labels, organs, sides, ijk_to_ras, orientation, int(seed), anatomy, bool(tumour))


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
