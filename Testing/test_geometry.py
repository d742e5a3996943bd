"""Tests of the model view: any axis-aligned storage of the same patient gives the same radiological slices,
and boxes on those slices map back to the right voxels and millimetres.

One synthetic "patient" is defined in RAS millimetres (labelled cuboid blobs plus a position code that makes
every voxel distinct) and stored in six orientations with anisotropic spacing and a nonzero origin.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from SlicerMiniGPTPancreas.geometry import (
    LPS_TO_RAS,
    GeometryError,
    ModelView,
    ObliqueVolumeError,
    mask_box,
    ras_matrix_from_sitk,
    resample_to_axial,
    tilt_displacement_voxels,
    volume_from_sitk,
)

ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "ASL", "LSP")  # where +i, +j, +k point
LETTER_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
# The voxel grid, per RAS axis: spacing (mm), voxel count, and the centre of the most right / anterior / inferior
# voxel. Columns run right -> left, rows anterior -> posterior, slices inferior -> superior.
SPACING = (0.75, 0.9, 2.5)
COUNT = (14, 11, 7)
RIGHT_ANTERIOR_INFERIOR = (30.0, 40.0, -140.0)
# Expected model_to_ras for every orientation: (c, r, s) -> (30 - 0.75 c, 40 - 0.9 r, -140 + 2.5 s).
MODEL_TO_RAS = np.array([[-0.75, 0, 0, 30.0], [0, -0.9, 0, 40.0], [0, 0, 2.5, -140.0], [0, 0, 0, 1]])
# Labelled cuboids in RAS mm: (x_min, x_max, y_min, y_max, z_min, z_max).
BLOBS = {
    1: (27.2, 31.0, 36.0, 41.0, -136.0, -129.0),  # patient's right-anterior, low
    2: (20.0, 23.0, 30.0, 33.0, -141.0, -134.0),  # patient's left-posterior
    3: (24.6, 25.4, 34.5, 35.0, -126.0, -124.0),  # a single voxel, top slice
}


def _patient(ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, image) at RAS points [..., 3]: blob labels, and a code unique to each voxel position."""
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    labels = np.zeros(x.shape, dtype=np.uint8)
    for label, (x0, x1, y0, y1, z0, z1) in BLOBS.items():
        labels[(x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)] = label
    image = np.round(x * 4).astype(np.int32) * 10_000 + np.round(y * 10).astype(np.int32) * 100 + np.round(z)
    return labels, image.astype(np.int32)


def _ijk_to_ras(orientation: str) -> np.ndarray:
    """[4, 4] for the grid stored with +i, +j, +k pointing as the three letters say."""
    matrix = np.eye(4)
    for ijk_axis, letter in enumerate(orientation):
        ras_axis, sign = LETTER_AXIS[letter]
        matrix[:3, ijk_axis] = 0.0
        matrix[ras_axis, ijk_axis] = sign * SPACING[ras_axis]
        # Index 0 sits at the end of the grid opposite to where the axis points.
        far = RIGHT_ANTERIOR_INFERIOR[ras_axis] + MODEL_TO_RAS[ras_axis, ras_axis] * (COUNT[ras_axis] - 1)
        near = RIGHT_ANTERIOR_INFERIOR[ras_axis]
        low, high = min(near, far), max(near, far)
        matrix[ras_axis, 3] = low if sign > 0 else high
    return matrix


def _stored_volume(orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [K, J, I], image [K, J, I], ijk_to_ras) of the patient stored in `orientation`."""
    matrix = _ijk_to_ras(orientation)
    shape_kji = tuple(COUNT[LETTER_AXIS[letter][0]] for letter in orientation[::-1])
    k, j, i = np.indices(shape_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)  # [K, J, I, 4]
    labels, image = _patient((ijk1 @ matrix.T)[..., :3])
    return labels, image, matrix


def _expected_model_view() -> tuple[np.ndarray, np.ndarray]:
    """(labels, image) [S, R, C] straight from the definition of the radiological axial view."""
    s, r, c = np.indices(COUNT[::-1])
    ras = np.stack([30.0 - 0.75 * c, 40.0 - 0.9 * r, -140.0 + 2.5 * s], axis=-1)
    return _patient(ras)


@pytest.fixture(scope="module", params=ORIENTATIONS)
def stored(request):
    labels, image, matrix = _stored_volume(request.param)
    return request.param, labels, image, matrix


def test_same_patient_gives_the_same_model_view_in_every_orientation(stored):
    orientation, labels, image, matrix = stored
    expected_labels, expected_image = _expected_model_view()
    view = ModelView.from_volume(image, matrix)
    assert view.shape == (7, 11, 14)
    np.testing.assert_array_equal(view.array, expected_image)
    np.testing.assert_array_equal(ModelView.from_volume(labels, matrix).array, expected_labels)
    assert np.shares_memory(view.array, image)  # permuted and flipped, never copied or interpolated
    np.testing.assert_allclose(view.spacing, SPACING)
    np.testing.assert_allclose(view.model_to_ras_matrix, MODEL_TO_RAS, atol=1e-12)


def test_right_anterior_object_is_top_left(stored):
    _, labels, _, matrix = stored
    view = ModelView.from_volume(labels, matrix)
    # Blob 1 covers x 30..27.75 (columns 0-3), y 40..36.4 (rows 0-4), z -135..-130 (slices 2-4).
    for s in range(7):
        assert mask_box(view.slice(s) == 1) == ((0, 0, 3, 4) if 2 <= s <= 4 else None)
    assert mask_box(view.slice(6) == 3) == (7, 6, 7, 6)


def test_model_and_voxel_indices_map_both_ways(stored):
    _, labels, _, matrix = stored
    view = ModelView.from_volume(labels, matrix)
    s, r, c = np.indices(view.shape)
    i, j, k = view.model_to_ijk(c, r, s)
    assert i.dtype.kind == "i"
    np.testing.assert_array_equal(labels[k, j, i], view.array)
    back = view.ijk_to_model(i, j, k)
    for got, want in zip(back, (c, r, s)):
        np.testing.assert_array_equal(got, want)
    assert all(isinstance(v, int) for v in view.model_to_ijk(2, 3, 4))
    halfway = view.ijk_to_model(*view.model_to_ijk(2.5, 3.0, 4.25))
    assert all(isinstance(v, float) for v in halfway) and halfway == (2.5, 3.0, 4.25)


@pytest.mark.parametrize("label", sorted(BLOBS))
def test_box_on_slices_maps_back_to_the_blob_voxels(stored, label):
    _, labels, _, matrix = stored
    view = ModelView.from_volume(labels, matrix)
    corners = []
    for s in range(view.shape[0]):
        box = mask_box(view.slice(s) == label)
        if box is not None:
            ijk = view.box_to_ijk(box, s)  # [2, 3]
            np.testing.assert_array_equal(ijk, np.round(ijk))
            i, j, k = ijk.astype(int).T
            assert np.all(labels[k, j, i] == label)
            corners.append(ijk)
    corners = np.concatenate(corners)  # [2 * slices, 3]
    k, j, i = np.nonzero(labels == label)
    np.testing.assert_array_equal(corners.min(axis=0), [i.min(), j.min(), k.min()])
    np.testing.assert_array_equal(corners.max(axis=0), [i.max(), j.max(), k.max()])


@pytest.mark.parametrize("label", sorted(BLOBS))
def test_box_physical_extent_matches_the_voxels(stored, label):
    _, labels, _, matrix = stored
    view = ModelView.from_volume(labels, matrix)
    ijk = np.argwhere(labels == label)[:, ::-1].astype(np.float64)  # [N, 3] as (i, j, k)
    ras = ijk @ matrix[:3, :3].T + matrix[:3, 3]  # [N, 3]
    for s in range(view.shape[0]):
        box = mask_box(view.slice(s) == label)
        if box is None:
            continue
        on_slice = ijk[np.isclose(ras[:, 2], -140.0 + 2.5 * s)]  # this slice's voxels, found by height
        offsets = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))  # [8, 3]
        voxel_corners = (on_slice[:, None, :] + offsets).reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
        low, high = voxel_corners.min(axis=0), voxel_corners.max(axis=0)
        center, size = view.box_to_ras(box, s)
        np.testing.assert_allclose(center, (low + high) / 2, atol=1e-9)
        np.testing.assert_allclose(size, high - low, atol=1e-9)
        np.testing.assert_allclose(np.sort(view.box_to_ras_corners(box, s), axis=0), [low, high], atol=1e-9)


def test_box_to_ras_by_hand():
    view = ModelView.from_volume(*_stored_volume("RPI")[1:])
    # Blob 1 on slice 3: columns 0-3 (x 30..27.75), rows 0-4 (y 40..36.4), z -132.5; half-voxel borders.
    center, size = view.box_to_ras((0, 0, 3, 4), 3)
    np.testing.assert_allclose(center, [28.875, 38.2, -132.5])
    np.testing.assert_allclose(size, [3.0, 4.5, 2.5])


def test_model_slice_of_k_for_axial_storage_only():
    for orientation in ("LPS", "RAS", "RPI"):
        _, image, matrix = _stored_volume(orientation)
        view = ModelView.from_volume(image, matrix)
        for k in range(image.shape[0]):
            height = (matrix @ [0, 0, k, 1])[2]  # stored slice k lies at this z (mm)
            assert view.model_slice_of_k(k) == round((height + 140.0) / 2.5)
    _, image, matrix = _stored_volume("ASL")
    with pytest.raises(GeometryError, match="not stored as axial"):
        ModelView.from_volume(image, matrix).model_slice_of_k(0)


def test_float_noise_in_the_direction_is_accepted():
    _, image, matrix = _stored_volume("LAS")
    noisy = matrix.copy()
    noisy[:3, :3] += np.random.default_rng(0).uniform(-1e-6, 1e-6, (3, 3))
    np.testing.assert_array_equal(ModelView.from_volume(image, noisy).array, _expected_model_view()[1])


def _tilted(matrix: np.ndarray, degrees: float, axis: int = 2) -> np.ndarray:
    """`matrix` turned by `degrees` about RAS axis `axis` (about x: a gantry tilt)."""
    angle = np.radians(degrees)
    rotation = np.eye(4)
    a, b = [n for n in range(3) if n != axis]
    rotation[[a, a, b, b], [a, b, a, b]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
    return rotation @ matrix


def test_oblique_volumes_are_refused_with_advice():
    _, image, matrix = _stored_volume("LPS")
    with pytest.raises(ObliqueVolumeError, match=r"oblique.*10.00 degrees.*voxels.*--resample") as caught:
        ModelView.from_volume(image, _tilted(matrix, 10.0))
    assert isinstance(caught.value, GeometryError) and isinstance(caught.value, ValueError)
    sheared = matrix.copy()
    sheared[:3, 1] = [-0.8, 0.5, 0.0]  # rows run closer to the columns' axis than to their own
    with pytest.raises(ObliqueVolumeError, match="45 degrees or more"):
        ModelView.from_volume(image, sheared)


def test_a_tilt_is_judged_by_how_far_it_moves_voxels_not_by_its_angle():
    # 0.1 degrees on this 10 x 10 x 15 mm grid moves no voxel by 0.02 voxel: the same view as untilted
    _, image, matrix = _stored_volume("LPS")
    np.testing.assert_array_equal(ModelView.from_volume(image, _tilted(matrix, 0.1)).array, _expected_model_view()[1])
    # a CT of 120 slices of 2.5 mm with 0.06 degrees of gantry tilt, refused before (sine 1.05e-3 > 1e-3): its far
    # slice moves 0.31 mm, 0.45 of a 0.7 mm row, so every voxel stays nearest to its own grid point: accepted
    ct = np.diag([0.7, 0.7, 2.5, 1.0])
    assert tilt_displacement_voxels(_tilted(ct, 0.06, axis=0)[:3, :3], (64, 64, 120)) == pytest.approx(
        np.sin(np.radians(0.06)) * 119 * 2.5 / 0.7, rel=1e-3)
    ModelView.from_volume(np.zeros((120, 64, 64), np.int16), _tilted(ct, 0.06, axis=0))
    with pytest.raises(ObliqueVolumeError, match="0.10 degrees.*0.74 voxels.*at most 0.5"):
        ModelView.from_volume(np.zeros((120, 64, 64), np.int16), _tilted(ct, 0.1, axis=0))


def test_a_half_degree_tilted_ct_resampled_puts_its_boxes_on_the_right_voxels():
    # a gantry-tilted grid (0.5 degrees about x) sampling the patient's blobs, stored LPS as DICOM would
    # voxels of half the size, 30 slices: 0.5 degrees moves the top slice's rows by 0.7 rows
    matrix = _tilted(_ijk_to_ras("LPS") @ np.diag([0.5, 0.5, 0.5, 1.0]), 0.5, axis=0)
    shape_kji = (30, 22, 28)
    k, j, i = np.indices(shape_kji)
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    ras = (ijk1 @ matrix.T)[..., :3]
    x0, x1, y0, y1, z0, z1 = (22.0, 26.0, 32.0, 36.0, -130.0, -120.0)  # a structure well inside the scan
    inside = (ras[..., 0] >= x0) & (ras[..., 0] <= x1) & (ras[..., 1] >= y0) & (ras[..., 1] <= y1) & \
        (ras[..., 2] >= z0) & (ras[..., 2] <= z1)
    with pytest.raises(ObliqueVolumeError, match="0.50 degrees"):
        ModelView.from_volume(inside, matrix)
    sitk = pytest.importorskip("SimpleITK")
    # a bright structure (1000 HU on 0), as the model would see it
    image = sitk.GetImageFromArray(np.where(inside, 1000, 0).astype(np.int16))
    image.SetSpacing(np.linalg.norm(matrix[:3, :3], axis=0).tolist())
    image.SetDirection((LPS_TO_RAS @ matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0)).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ matrix[:3, 3]).tolist())
    resampled = resample_to_axial(image)
    view = ModelView.from_volume(*volume_from_sitk(resampled))
    assert view.shape == (30, 22, 28)
    assert np.allclose(view.model_to_ras_matrix[:3, :3], np.diag([-0.375, -0.45, 1.25]))  # axis-aligned now
    hits = 0
    for s in range(view.shape[0]):
        box = mask_box(view.slice(s) > 500)
        if box is None:
            continue
        hits += 1
        (cx, cy, cz), (width, depth, _) = view.box_to_ras(box, s)
        assert z0 - 1.25 <= cz <= z1 + 1.25  # the blob's slices
        # the box's physical extent is the blob's, within one voxel and the 0.5 degree tilt's shear
        assert abs((cx - width / 2) - x0) <= 0.5 and abs((cx + width / 2) - x1) <= 0.5
        assert abs((cy - depth / 2) - y0) <= 0.6 and abs((cy + depth / 2) - y1) <= 0.6
    assert hits >= 4


def test_bad_volumes_are_refused():
    _, image, matrix = _stored_volume("LPS")
    singular, parallel, not_affine = matrix.copy(), matrix.copy(), matrix.copy()
    singular[:3, 1] = 0.0
    parallel[:3, 1] = parallel[:3, 0]
    not_affine[3] = [0, 0, 1, 1]
    cases = [
        (image[0], matrix, "3D volume"),
        (image[None], matrix, "3D volume"),
        (image[:, :0], matrix, "no voxels"),
        (image, matrix[:3, :3], "4x4"),
        (image, np.full((4, 4), np.nan), "finite affine"),
        (image, not_affine, "finite affine"),
        (image, singular, "singular"),
        (image, parallel, "singular"),
    ]
    for array, bad_matrix, message in cases:
        with pytest.raises(GeometryError, match=message):
            ModelView.from_volume(array, bad_matrix)


def test_bad_boxes_and_slices_are_refused():
    view = ModelView.from_volume(*_stored_volume("LSP")[1:])
    for box, s, message in [
        ((3, 0, 1, 4), 2, "x_max < x_min"),
        ((0, 0, 1), 2, "four finite numbers"),
        ((0, np.nan, 1, 4), 2, "four finite numbers"),
        ((0, 0, 1, 4), 7, "outside the volume"),
        ((0, 0, 1, 4), -1, "outside the volume"),
        ((0, 0, 1, 4), 2.0, "must be an integer"),
    ]:
        with pytest.raises(GeometryError, match=message):
            view.box_to_ras(box, s)
    with pytest.raises(GeometryError, match="outside the volume"):
        view.slice(7)


def test_mask_box_is_inclusive_with_x_as_column():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:7] = True  # rows 1-3, columns 2-6
    assert mask_box(mask) == (2, 1, 6, 3)
    assert mask_box(np.zeros((3, 3))) is None
    with pytest.raises(GeometryError, match="2D mask"):
        mask_box(np.zeros((2, 3, 3)))


@pytest.mark.parametrize("orientation", ["RAS", "ASL", "RPI", "LSP"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_files_written_by_simpleitk_give_the_same_model_view(tmp_path, orientation, suffix):
    sitk = pytest.importorskip("SimpleITK")
    _, image, matrix = _stored_volume(orientation)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    lps_from_ras = np.diag([-1.0, -1.0, 1.0])
    written = sitk.GetImageFromArray(image)  # array [K, J, I] -> image (i, j, k)
    written.SetSpacing(spacing.tolist())
    written.SetDirection((lps_from_ras @ (matrix[:3, :3] / spacing)).ravel().tolist())
    written.SetOrigin((lps_from_ras @ matrix[:3, 3]).tolist())
    np.testing.assert_allclose(ras_matrix_from_sitk(written), matrix, atol=1e-12)
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(written, str(path))
    array_kji, ijk_to_ras = volume_from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(ijk_to_ras, matrix, atol=1e-4)
    view = ModelView.from_volume(array_kji, ijk_to_ras)
    np.testing.assert_array_equal(view.array, _expected_model_view()[1])
    np.testing.assert_allclose(view.model_to_ras_matrix, MODEL_TO_RAS, atol=1e-4)


def test_vector_images_are_refused():
    sitk = pytest.importorskip("SimpleITK")
    rgb = sitk.Image([4, 3, 2], sitk.sitkVectorUInt8, 3)
    with pytest.raises(GeometryError, match="scalar volume"):
        volume_from_sitk(rgb)
