"""Tests of the slice preprocessing: upstream's 8-bit images, byte for byte.

The reference for the byte rule is matplotlib itself (`plt.imsave(cmap="gray")` to a real PNG, read back with
PIL), as upstream wrote its training slices; hand-computed cases pin the same rule when matplotlib is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from SlicerMiniGPTPancreas.preprocess import (
    IntensityError,
    _rescale_intensity,
    apply_rescale,
    gray_to_rgb,
    hu_slice_to_gray,
    hu_slice_to_rgb,
    matplotlib_gray_bytes,
    paper_contrast,
)

# docs/upstream.md 4.2: the gray-table indices whose byte is idx - 1.
SPEC_ONE_LOWER = [
    33, 37, 41, 45, 49, 53, 57, 61, 66, 74, 82, 90, 98, 106, 114, 122, 132, 148, 164, 180, 196, 212, 228, 244
]  # fmt: skip


def _every_level_slice() -> np.ndarray:
    """HU slice [17, 16]: the centre of each of the 256 levels, plus -150 and 250 so min-max is a no-op."""
    levels = -150.0 + 400.0 * (np.arange(256) + 0.5) / 256  # [256]
    return np.concatenate([levels, [-150.0, 250.0] + [0.0] * 14]).reshape(17, 16)


def _abdomen_slice(seed: int, shape: tuple[int, int] = (192, 224)) -> np.ndarray:
    """Realistic-looking int16 HU slice [R, C]: air, fat, soft tissue, a contrast vessel, bone, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    r, c = (rows - shape[0] / 2) / (shape[0] * 0.42), (cols - shape[1] / 2) / (shape[1] * 0.45)
    hu = np.full(shape, -1000.0)
    hu[r**2 + c**2 < 1.0] = -100.0  # subcutaneous fat
    hu[r**2 + c**2 < 0.8] = 45.0  # soft tissue
    hu[(r - 0.1) ** 2 + (c + 0.3) ** 2 < 0.02] = 180.0  # enhancing vessel
    hu[(r - 0.6) ** 2 + c**2 < 0.03] = 700.0  # vertebra
    hu += rng.normal(0.0, 12.0, shape)
    return hu.astype(np.int16)


def _upstream_window(slice_hu: np.ndarray) -> np.ndarray:
    """Upstream HEAD's own lines (float64): clip to [-150, 250], then (s - lower) / (upper - lower)."""
    lower, upper = -150, 250
    s = np.clip(slice_hu.astype(np.float64), lower, upper)
    return (s - lower) / (upper - lower)


# ---- hand-computed: always runs -------------------------------------------------------------------------


def test_gray_table_matches_truncated_linspace_and_spec_list():
    # Byte of level idx = uint8(lut[idx] * 255) with lut = linspace(0, 1, 256): derive it here from scratch.
    derived = (np.linspace(0.0, 1.0, 256) * 255).astype(np.uint8)
    assert np.flatnonzero(derived != np.arange(256)).tolist() == SPEC_ONE_LOWER
    values = np.concatenate([[0.0, 1.0], (np.arange(256) + 0.5) / 256]).reshape(2, 129)  # min 0, max 1
    gray = matplotlib_gray_bytes(values).reshape(-1)[2:]
    expected = np.array([idx - 1 if idx in SPEC_ONE_LOWER else idx for idx in range(256)], dtype=np.uint8)
    np.testing.assert_array_equal(gray, expected)


def test_window_bytes_by_hand():
    # -150 -> level 0, 250 -> 255 (1.0 joins the top level); 40 HU -> int(190/400*256) = 121;
    # 46.25 HU -> int(196.25/400*256) = int(125.6) = 125; 60 HU -> int(134.4) = 134;
    # -97.5 HU -> 52.5/400*256 = 33.6 -> level 33 -> byte 32 (one of the 24); -1000 and 3000 clip to the ends.
    hu = np.array([[-150.0, 250.0, 40.0, 46.25], [60.0, -97.5, -1000.0, 3000.0]])
    expected = np.array([[0, 255, 121, 125], [134, 32, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(hu_slice_to_gray(hu), expected)


def test_window_renormalises_each_slice_by_its_own_range():
    # No air and no bone: the window leaves [0.25, 0.75]; imsave stretches it to the full 0..255 again.
    hu = np.array([[-50.0, 50.0], [150.0, 0.0]])  # windowed: 0.25, 0.5, 0.75, 0.375
    # min-max over [0.25, 0.75]: 0.25 -> 0; 0.5 -> 0.5 -> 128; 0.75 -> 1.0 -> 255; 0.375 -> 0.25 -> 64
    np.testing.assert_array_equal(hu_slice_to_gray(hu), np.array([[0, 128], [255, 64]], dtype=np.uint8))


def test_constant_slices_are_black():
    for value in (-1000.0, 40.0, 3000.0):
        np.testing.assert_array_equal(hu_slice_to_gray(np.full((5, 7), value)), np.zeros((5, 7), np.uint8))
        np.testing.assert_array_equal(
            hu_slice_to_gray(np.full((5, 7), value), "paper"), np.zeros((5, 7), np.uint8)
        )
    # Different HU values that all clip to the same window end are also constant after windowing.
    np.testing.assert_array_equal(hu_slice_to_gray(np.array([[-1000.0, -300.0], [-150.0, -2000.0]])), 0)


def test_paper_variant_by_hand():
    # 100 pixels: -1000 (1), -100 (39), 0 (20), 100 (39), 3000 (1). Percentiles (linear): p2 = sorted[1.98]
    # = -100, p98 = sorted[97.02] = 100, so the outliers clip. rescale_intensity -> [-1, 1] (p2 < 0):
    # -1 (40 px), 0 (20 px), 1 (40 px). 256-bin histogram over [-1, 1]: 0 is the left edge of bin 128, so
    # cdf = 0.4 on bins 0..127, 0.6 on 128..254, 1.0 on 255. Interpolated at the bin centres: -1 -> 0.4
    # (clamped), 0 -> midway between centres 127 and 128 -> 0.5, 1 -> 1.0. Bytes: min-max over [0.4, 1]:
    # 0 -> 0, 0.5 -> int(256/6) = 42, 1 -> 255.
    hu = np.array([-1000.0] + [-100.0] * 39 + [0.0] * 20 + [100.0] * 39 + [3000.0]).reshape(10, 10)
    np.testing.assert_allclose(np.unique(paper_contrast(hu)), [0.4, 0.5, 1.0])
    gray = hu_slice_to_gray(hu, variant="paper")
    expected = np.select([hu <= -100, hu == 0], [0, 42], 255).astype(np.uint8)
    np.testing.assert_array_equal(gray, expected)
    # Shifted to all-positive HU (so skimage's [0, 1] output range): equalisation gives the same image.
    np.testing.assert_array_equal(hu_slice_to_gray(hu + 1100.0, variant="paper"), expected)


def test_rescale_intensity_output_range_follows_skimage():
    # Invisible after equalisation (up to float rounding), so checked directly: skimage's float "dtype"
    # range is [-1, 1], narrowed to [0, 1] when the input range starts at >= 0; values clip to the input range.
    image = np.array([[-300.0, -100.0], [0.0, 500.0]])
    np.testing.assert_allclose(_rescale_intensity(image, -100.0, 100.0), [[-1.0, -1.0], [0.0, 1.0]])
    np.testing.assert_allclose(_rescale_intensity(image, 0.0, 400.0), [[0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(_rescale_intensity(image, 0.0, 0.0), [[0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(_rescale_intensity(image, -5.0, -5.0), [[-1.0, -1.0], [-1.0, -1.0]])


def test_paper_variant_is_monotone_and_saturates_above_p98():
    hu = _abdomen_slice(seed=3).astype(np.float64)
    gray = hu_slice_to_gray(hu, "paper")
    order = np.argsort(hu, axis=None, kind="stable")
    assert np.all(np.diff(gray.reshape(-1)[order].astype(int)) >= 0)  # brighter HU never gets darker
    assert np.all(gray[hu >= np.percentile(hu, 98)] == 255)
    assert np.all(gray[hu <= np.percentile(hu, 2)] == 0)


def test_rgb_has_three_equal_channels():
    hu = _abdomen_slice(seed=1)
    rgb = hu_slice_to_rgb(hu)
    assert rgb.shape == hu.shape + (3,) and rgb.dtype == np.uint8
    gray = hu_slice_to_gray(hu)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)
    with pytest.raises(IntensityError, match="uint8"):
        gray_to_rgb(gray.astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_slices_are_refused(bad):
    hu = np.zeros((4, 4))
    hu[1, 2] = bad
    with pytest.raises(IntensityError, match="NaN or infinite"):
        hu_slice_to_gray(hu)


def test_bad_shapes_and_variants_are_refused():
    with pytest.raises(IntensityError, match="2D slice"):
        hu_slice_to_gray(np.zeros((2, 3, 4)))
    with pytest.raises(IntensityError, match="2D slice"):
        hu_slice_to_gray(np.zeros((0, 4)))
    with pytest.raises(IntensityError, match="Unknown intensity variant"):
        hu_slice_to_gray(np.zeros((3, 3)), variant="clahe")


def test_apply_rescale_gives_float32_hu():
    stored = np.array([[0, 1024], [1064, 4095]], dtype=np.uint16)
    hu = apply_rescale(stored, slope=1, intercept=-1024)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [[-1024.0, 0.0], [40.0, 3071.0]])
    np.testing.assert_array_equal(apply_rescale(np.array([-200, 0, 300], np.int16), 0.5, -100.0), [-200, -100, 50])
    for slope, intercept in ((0.0, 0.0), (np.nan, 0.0), (1.0, np.inf)):
        with pytest.raises(IntensityError, match="RescaleSlope"):
            apply_rescale(stored, slope, intercept)


# ---- matplotlib itself as the reference ------------------------------------------------------------------


def _imsave_gray(tmp_path, values: np.ndarray) -> np.ndarray:
    """Write `values` with plt.imsave(cmap="gray") to a real PNG and read it back: uint8 [R, C, 4]."""
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib is the byte-rule reference")
    from PIL import Image

    path = tmp_path / f"slice_{len(list(tmp_path.iterdir()))}.png"
    plt.imsave(path, values, cmap="gray")
    with Image.open(path) as image:
        assert image.mode == "RGBA"
        return np.asarray(image)


def _reference_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    boundaries = (-150.0 + 400.0 * np.arange(257) / 256).tolist()  # exact level edges (k * 1.5625 - 150)
    return {
        "every_level_centre": _every_level_slice(),
        "every_level_edge": np.array(boundaries + [0.0] * 15).reshape(16, 17),
        "inside_window_only": rng.uniform(-80.0, 120.0, (40, 50)),
        "constant": np.full((8, 9), 37.0),
        "constant_after_clip": rng.uniform(-3000.0, -151.0, (8, 9)),
        "abdomen_0": _abdomen_slice(seed=0).astype(np.float64),
        "abdomen_1": _abdomen_slice(seed=1).astype(np.float64),
        "dense_uniform": rng.uniform(-200.0, 300.0, (128, 128)),
    }


@pytest.mark.parametrize("case", list(_reference_cases()))
def test_window_bytes_equal_matplotlib_imsave(tmp_path, case):
    hu = _reference_cases()[case]
    png = _imsave_gray(tmp_path, _upstream_window(hu))  # [R, C, 4]
    gray = hu_slice_to_gray(hu)
    for channel in range(3):
        np.testing.assert_array_equal(gray, png[:, :, channel])
    assert np.all(png[:, :, 3] == 255)


@pytest.mark.parametrize("case", ["every_level_centre", "abdomen_0", "abdomen_1", "dense_uniform", "constant"])
def test_paper_bytes_equal_matplotlib_imsave_of_the_equalised_slice(tmp_path, case):
    hu = _reference_cases()[case]
    png = _imsave_gray(tmp_path, paper_contrast(hu))
    np.testing.assert_array_equal(hu_slice_to_gray(hu, "paper"), png[:, :, 0])


def test_int16_input_gives_the_same_bytes_as_float64(tmp_path):
    hu = _abdomen_slice(seed=5)  # int16, as read from NIfTI/DICOM
    png = _imsave_gray(tmp_path, _upstream_window(hu))
    np.testing.assert_array_equal(hu_slice_to_gray(hu), png[:, :, 0])
