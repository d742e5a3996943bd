"""A gantry-tilted CT with a bright block at known patient coordinates, for the tests of resampling in the service
and the Slicer module: a box drawn around the block on the slices the server resampled, mapped to RAS with the grid
the client computes (geometry.nearest_axial_grid of the matrix it sent), must cover the block."""

from __future__ import annotations

import numpy as np

from SlicerMiniGPTPancreas.geometry import ModelView, mask_box

BLOCK = (22.0, 26.0, 32.0, 36.0, -130.0, -120.0)  # RAS x0, x1, y0, y1, z0, z1 in mm, well inside the scan


def tilted_ct(degrees: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(HU [K, J, I], ijk_to_ras) of a CT stored LPS (as DICOM), 30 slices of 1.25 mm on 0.375 x 0.45 mm pixels,
    its grid turned about the patient's left-right axis: 0.5 degrees moves the top slice's rows by 0.7 rows. The
    block is 1000 HU on 0."""
    axial = np.array([[-0.375, 0, 0, 30.0], [0, -0.45, 0, 38.0], [0, 0, 1.25, -140.0], [0, 0, 0, 1]])
    angle = np.radians(degrees)
    turn = np.eye(4)
    turn[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix = turn @ axial
    k, j, i = np.indices((30, 22, 28))
    ras = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64) @ matrix.T
    x0, x1, y0, y1, z0, z1 = BLOCK
    inside = ((ras[..., 0] >= x0) & (ras[..., 0] <= x1) & (ras[..., 1] >= y0) & (ras[..., 1] <= y1)
              & (ras[..., 2] >= z0) & (ras[..., 2] <= z1))
    return np.where(inside, 1000, 0).astype(np.int16), matrix


def assert_block_boxes_cover_the_block(array_src: np.ndarray, view: ModelView) -> None:
    """Every slice's box around the bright voxels, mapped to RAS by `view`, is the block within a voxel."""
    x0, x1, y0, y1, z0, z1 = BLOCK
    hits = 0
    for s in range(array_src.shape[0]):
        box = mask_box(array_src[s] > 500)
        if box is None:
            continue
        hits += 1
        (cx, cy, cz), (width, depth, _) = view.box_to_ras(box, s)
        assert z0 - 1.25 <= cz <= z1 + 1.25
        assert abs((cx - width / 2) - x0) <= 0.5 and abs((cx + width / 2) - x1) <= 0.5
        assert abs((cy - depth / 2) - y0) <= 0.6 and abs((cy + depth / 2) - y1) <= 0.6  # a voxel and the shear
    assert hits >= 4
