"""Model view of a CT volume and the mapping of its boxes back to voxels and millimetres.

The model only ever sees radiological axial slices: image up = anterior, image left = patient right.
`ModelView` presents any axis-aligned volume (NIfTI, DICOM, NRRD; any storage order, spacing, origin)
in LPS index order without interpolation (axes permuted and flipped only), as an array indexed
[s, r, c]: s counts inferior -> superior, r anterior -> posterior, c patient right -> left.
A grid tilted so little that no voxel centre moves by more than TILT_TOLERANCE_VOXELS when it is taken as
axis-aligned (float noise, a hundredth of a degree of gantry tilt) is taken so; a more tilted (oblique) volume
is refused, because showing it as axial slices needs resampling: `resample_to_axial` does that, onto
`nearest_axial_grid` (the same voxel counts and sizes, axes snapped to the patient axes, the same centre).

Conventions (shared with the rest of the core):
- a volume is a voxel array indexed [k, j, i] plus a 4x4 `ijk_to_ras` matrix mapping (i, j, k, 1) to RAS mm;
- a `Box` on a model-view slice is (x_min, y_min, x_max, y_max) in index coordinates, x = column c,
  y = row r, pixel centres at integers; ground-truth boxes are inclusive integer indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError

# RAS <-> LPS (its own inverse): ITK, DICOM and .mrk.json files speak LPS, this project RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

Box = tuple[float, float, float, float]

# Largest displacement, in voxels of the axis it moves along, of any voxel centre when a slightly tilted grid
# is taken as axis-aligned: below half a voxel every voxel stays nearest to its own grid point. A limit on the
# displacement across the volume, not on the angle: 0.06 degrees of gantry tilt moves the far slice of a 30 cm
# scan by 0.31 mm (0.45 of a 0.7 mm row), which the old limit on the angle's sine (1e-3) refused.
TILT_TOLERANCE_VOXELS = 0.5

# For each model axis (c, r, s): the RAS axis it runs along and the direction it must point to.
# c -> patient left (-R), r -> posterior (-A), s -> superior (+S): LPS index order.
_MODEL_AXES = ((0, -1.0), (1, -1.0), (2, +1.0))


class GeometryError(UserError, ValueError):
    """The volume or its geometry cannot be used (wrong array shape, singular matrix, bad box or slice)."""


class ObliqueVolumeError(GeometryError):
    """The volume's voxel axes are tilted against the patient axes, so it has no axial slices as stored."""


@dataclass(frozen=True, eq=False)
class ModelView:
    """A volume seen in LPS index order. Build it with `ModelView.from_volume`."""

    array: np.ndarray  # [S, R, C], a view of the volume's array
    ijk_to_ras: np.ndarray  # [4, 4] float64
    model_to_ijk_matrix: np.ndarray  # [4, 4] int64: (c, r, s, 1) -> (i, j, k, 1); signed permutation + offsets

    @classmethod
    def from_volume(
        cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray, *, tolerance_voxels: float = TILT_TOLERANCE_VOXELS
    ) -> ModelView:
        """Reorient `array_kji` [K, J, I] to the model view; raise `ObliqueVolumeError` for oblique volumes."""
        array_kji = np.asarray(array_kji)
        matrix = _checked_matrix(array_kji, ijk_to_ras)
        sizes_ijk = array_kji.shape[::-1]  # (I, J, K)
        ijk_axis_of_model, flipped = _model_axes_in_ijk(matrix[:3, :3], sizes_ijk, tolerance_voxels)
        model_to_ijk = np.eye(4, dtype=np.int64)
        model_to_ijk[:3, :3] = 0
        for model_axis, (ijk_axis, flip) in enumerate(zip(ijk_axis_of_model, flipped)):
            model_to_ijk[ijk_axis, model_axis] = -1 if flip else 1
            model_to_ijk[ijk_axis, 3] = sizes_ijk[ijk_axis] - 1 if flip else 0
        # Array axis of ijk axis a is 2 - a; model array axes are ordered (s, r, c).
        view = np.transpose(array_kji, [2 - ijk_axis_of_model[m] for m in (2, 1, 0)])
        view = view[tuple(slice(None, None, -1 if flipped[m] else 1) for m in (2, 1, 0))]
        return cls(array=view, ijk_to_ras=matrix, model_to_ijk_matrix=model_to_ijk)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, R, C): number of axial slices, rows, columns."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def model_to_ras_matrix(self) -> np.ndarray:
        """[4, 4] float64 mapping (c, r, s, 1) to RAS mm."""
        return self.ijk_to_ras @ self.model_to_ijk_matrix

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(col_mm, row_mm, slice_mm): voxel size along c, r and s."""
        norms = np.linalg.norm(self.model_to_ras_matrix[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    def slice(self, s: int) -> np.ndarray:
        """Axial model-view slice s, [R, C]: up = anterior, left = patient right."""
        return self.array[self._checked_slice_index(s)]

    def model_to_ijk(self, c: Any, r: Any, s: Any) -> tuple:
        """Map model coordinates to (i, j, k); integer in -> integer out, arrays broadcast."""
        return _apply_affine(self.model_to_ijk_matrix, c, r, s)

    def ijk_to_model(self, i: Any, j: Any, k: Any) -> tuple:
        """Map voxel coordinates (i, j, k) to model coordinates (c, r, s); inverse of `model_to_ijk`."""
        return _apply_affine(_inverse_signed_permutation(self.model_to_ijk_matrix), i, j, k)

    def model_slice_of_k(self, k: int) -> int:
        """Model slice index s of stored slice k, for volumes stored as axial slices (k along S-I)."""
        if self.model_to_ijk_matrix[2, 2] == 0:
            raise GeometryError(
                "This volume is not stored as axial slices (its k axis is not inferior-superior); "
                "map voxels with ijk_to_model instead."
            )
        return int(self.ijk_to_model(0, 0, int(k))[2])

    def box_to_ijk(self, box: Box, s: int) -> np.ndarray:
        """[2, 3] continuous (i, j, k) of the box's two opposite corner pixel centres on slice s."""
        c0, r0, c1, r1 = _checked_box(box)
        s = self._checked_slice_index(s)
        corners_model = np.array([[c0, r0, s, 1.0], [c1, r1, s, 1.0]])  # [2, 4]
        return (corners_model @ self.model_to_ijk_matrix.T)[:, :3]

    def box_to_ras_corners(self, box: Box, s: int) -> np.ndarray:
        """[2, 3] RAS mm of two opposite corners of the box's physical extent (half-voxel borders, one slice thick)."""
        c0, r0, c1, r1 = _checked_box(box)
        s = self._checked_slice_index(s)
        corners_model = np.array([[c0 - 0.5, r0 - 0.5, s - 0.5, 1.0], [c1 + 0.5, r1 + 0.5, s + 0.5, 1.0]])
        return (corners_model @ self.model_to_ras_matrix.T)[:, :3]

    def box_to_ras(self, box: Box, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(center_ras [3], size_mm [3]) of the box's physical extent; size along R, A, S (thickness = slice)."""
        corners = self.box_to_ras_corners(box, s)  # [2, 3]
        return corners.mean(axis=0), np.abs(corners[1] - corners[0])

    def _checked_slice_index(self, s: Any) -> int:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise GeometryError(f"Slice index must be an integer, got {s!r}.")
        if not 0 <= s < self.shape[0]:
            raise GeometryError(f"Slice index {s} is outside the volume (0..{self.shape[0] - 1}).")
        return int(s)


def mask_box(mask2d: np.ndarray) -> Box | None:
    """Inclusive (x_min, y_min, x_max, y_max) of the nonzero pixels of a 2D mask [R, C]; None if empty."""
    mask = np.asarray(mask2d)
    if mask.ndim != 2:
        raise GeometryError(f"mask_box needs a 2D mask [rows, columns], got shape {mask.shape}.")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))


def ras_matrix_from_sitk(image: Any) -> np.ndarray:
    """[4, 4] ijk_to_ras of a 3D SimpleITK image (ITK geometry is LPS: negate the first two rows)."""
    if image.GetDimension() != 3:
        raise GeometryError(f"Expected a 3D image, got a {image.GetDimension()}D one.")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_TO_RAS @ direction * np.array(image.GetSpacing(), dtype=np.float64)  # scale columns
    ijk_to_ras[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    return ijk_to_ras


def volume_from_sitk(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """(array [K, J, I], ijk_to_ras [4, 4]) of a scalar 3D SimpleITK image."""
    import SimpleITK as sitk  # lazy: the core must import without SimpleITK

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(
            f"Expected a scalar volume, got {image.GetNumberOfComponentsPerPixel()} values per voxel "
            "(a colour or vector image); load a single-channel CT volume."
        )
    ijk_to_ras = ras_matrix_from_sitk(image)
    return sitk.GetArrayFromImage(image), ijk_to_ras


def _checked_matrix(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Validate the array and matrix; return the matrix as float64 [4, 4]."""
    if array_kji.ndim != 3:
        raise GeometryError(f"Expected a 3D volume array [k, j, i], got shape {array_kji.shape}.")
    if min(array_kji.shape) == 0:
        raise GeometryError(f"The volume has no voxels (shape {array_kji.shape}).")
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise GeometryError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}.")
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise GeometryError("ijk_to_ras must be a finite affine matrix with last row (0, 0, 0, 1).")
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing == 0) or abs(np.linalg.det(matrix[:3, :3] / spacing)) < 1e-6:
        raise GeometryError(
            "ijk_to_ras is singular (a zero voxel size or two parallel voxel axes); "
            "check the volume's spacing and direction."
        )
    return matrix


def _model_axes_in_ijk(linear: np.ndarray, sizes_ijk: tuple[int, ...],
                       tolerance_voxels: float) -> tuple[list[int], list[bool]]:
    """For each model axis (c, r, s): the ijk axis it runs along and whether it runs backwards."""
    cosines = linear / np.linalg.norm(linear, axis=0)  # [3 RAS, 3 ijk], unit columns
    ras_axis_of_ijk = _ras_axis_of_ijk(cosines)
    displacement = tilt_displacement_voxels(linear, sizes_ijk)
    if displacement > tolerance_voxels:
        raise ObliqueVolumeError(_oblique_message(cosines, ras_axis_of_ijk, displacement, tolerance_voxels))
    ijk_axis_of_model, flipped = [], []
    for ras_axis, direction in _MODEL_AXES:
        ijk_axis = int(np.flatnonzero(ras_axis_of_ijk == ras_axis)[0])
        ijk_axis_of_model.append(ijk_axis)
        flipped.append(bool(np.sign(cosines[ras_axis, ijk_axis]) != direction))
    return ijk_axis_of_model, flipped


def _ras_axis_of_ijk(cosines: np.ndarray) -> np.ndarray:
    """[3] the RAS axis each ijk axis runs closest to; refused when two share one (45 degrees or more)."""
    ras_axis_of_ijk = np.argmax(np.abs(cosines), axis=0)
    if len(set(ras_axis_of_ijk.tolist())) < 3:
        raise ObliqueVolumeError(
            "The volume is oblique by 45 degrees or more: two of its voxel axes run closest to the same patient "
            "axis, so it has no nearest axial grid. Reformat it in 3D Slicer (Resample Image (BRAINS) with an "
            "axis-aligned reference), then try again.")
    return ras_axis_of_ijk


def tilt_displacement_voxels(linear: np.ndarray, sizes_ijk: tuple[int, ...]) -> float:
    """How far (in voxels of the axis it moves along) a voxel centre moves at worst when the grid of `linear`
    ([3 RAS, 3 ijk] mm per voxel step) with `sizes_ijk` voxels is taken as axis-aligned: 0 for an aligned grid."""
    linear = np.asarray(linear, dtype=np.float64)
    ras_axis_of_ijk = _ras_axis_of_ijk(linear / np.linalg.norm(linear, axis=0))
    off_axis = linear.copy()
    off_axis[ras_axis_of_ijk, [0, 1, 2]] = 0.0  # [3, 3] the tilt part of each voxel step, mm
    spacing_along_ras = np.empty(3)
    spacing_along_ras[ras_axis_of_ijk] = np.linalg.norm(linear, axis=0)
    corners = np.array([[i, j, k] for i in (0, sizes_ijk[0] - 1) for j in (0, sizes_ijk[1] - 1)
                        for k in (0, sizes_ijk[2] - 1)], dtype=np.float64)  # [8, 3] far corners, in voxels
    return float(np.abs(corners @ off_axis.T / spacing_along_ras).max())


def nearest_axial_grid(ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> np.ndarray:
    """[4, 4] ijk_to_ras of the axis-aligned grid nearest to a tilted one: each voxel axis snapped to the patient
    axis it runs closest to (same voxel size, same direction sign), the same voxel counts, the same centre."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    linear = matrix[:3, :3]
    ras_axis_of_ijk = _ras_axis_of_ijk(linear / np.linalg.norm(linear, axis=0))
    snapped = np.zeros((3, 3))
    for ijk_axis, ras_axis in enumerate(ras_axis_of_ijk):
        snapped[ras_axis, ijk_axis] = np.sign(linear[ras_axis, ijk_axis]) * np.linalg.norm(linear[:, ijk_axis])
    centre_ijk = (np.array(shape_kji[::-1], dtype=np.float64) - 1) / 2
    grid = np.eye(4)
    grid[:3, :3] = snapped
    grid[:3, 3] = linear @ centre_ijk + matrix[:3, 3] - snapped @ centre_ijk  # the centre stays where it was
    return grid


def resample_to_axial(image: Any) -> Any:
    """A 3D SimpleITK image resampled (linear interpolation) onto `nearest_axial_grid`; voxels that fall outside
    the original get its lowest value (air or padding)."""
    import SimpleITK as sitk  # lazy: the core must import without SimpleITK

    grid_ras = nearest_axial_grid(ras_matrix_from_sitk(image), image.GetSize()[::-1])
    spacing = np.linalg.norm(grid_ras[:3, :3], axis=0)
    direction_lps = LPS_TO_RAS @ grid_ras[:3, :3] / spacing
    lowest = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image.GetSize(), sitk.Transform(), sitk.sitkLinear,
                         (LPS_TO_RAS @ grid_ras[:3, 3]).tolist(), spacing.tolist(), direction_lps.ravel().tolist(),
                         lowest, image.GetPixelID())


def resample_volume_to_axial(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`resample_to_axial` for an array [K, J, I] and its ijk_to_ras: (array [K, J, I], ijk_to_ras of
    `nearest_axial_grid`)."""
    import SimpleITK as sitk  # lazy: the core must import without SimpleITK

    matrix = _checked_matrix(array_kji, ijk_to_ras)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_TO_RAS @ matrix[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ matrix[:3, 3]).tolist())
    return volume_from_sitk(resample_to_axial(image))


def _oblique_message(cosines: np.ndarray, ras_axis_of_ijk: np.ndarray, displacement: float,
                     tolerance_voxels: float) -> str:
    on_axis = np.abs(cosines[ras_axis_of_ijk, [0, 1, 2]])
    angle = float(np.degrees(np.arccos(np.clip(on_axis.min(), -1.0, 1.0))))
    return (
        f"The volume is oblique: its voxel axes are tilted by {angle:.2f} degrees from the patient axes, which "
        f"moves voxels by up to {displacement:.2f} voxels across the volume (at most {tolerance_voxels:g} is "
        "accepted), so it has no axial slices as stored. Resample it onto the nearest axial grid (`minigpt-pancreas "
        "predict --resample` does; in 3D Slicer: Resample Image (BRAINS) with an axis-aligned reference), then "
        "try again."
    )


def _checked_box(box: Box) -> tuple[float, float, float, float]:
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.size != 4 or not np.all(np.isfinite(values)):
        raise GeometryError(f"A box is four finite numbers (x_min, y_min, x_max, y_max), got {box!r}.")
    x0, y0, x1, y1 = (float(v) for v in values)
    if x1 < x0 or y1 < y0:
        raise GeometryError(f"Box {box!r} has x_max < x_min or y_max < y_min.")
    return x0, y0, x1, y1


def _inverse_signed_permutation(matrix: np.ndarray) -> np.ndarray:
    """Exact integer inverse of a [4, 4] affine whose linear part is a signed permutation."""
    inverse = np.eye(4, dtype=np.int64)
    inverse[:3, :3] = matrix[:3, :3].T  # orthogonal: inverse = transpose
    inverse[:3, 3] = -inverse[:3, :3] @ matrix[:3, 3]
    return inverse


def _apply_affine(matrix: np.ndarray, a: Any, b: Any, c: Any) -> tuple:
    """Apply a [4, 4] affine to broadcast coordinate arrays; integers stay integers, scalars stay scalars."""
    coords = np.broadcast_arrays(*(np.asarray(v) for v in (a, b, c)))
    integral = all(np.issubdtype(v.dtype, np.integer) for v in coords)
    stacked = np.stack(coords).astype(np.int64 if integral else np.float64)  # [3, ...]
    out = np.tensordot(matrix[:3, :3], stacked, axes=1)  # [3, ...]
    out = out + matrix[:3, 3].reshape((3,) + (1,) * (out.ndim - 1))
    if out.ndim == 1:
        return tuple(v.item() for v in out)
    return tuple(out)
