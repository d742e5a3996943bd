"""CT slice -> the exact 8-bit image MiniGPT-Pancreas was trained on.

Upstream wrote every training slice with `matplotlib.pyplot.imsave(path, s, cmap="gray")` (matplotlib 3.7),
after one of two intensity steps:
- "window" (upstream HEAD): clip HU to [-150, 250] and scale to [0, 1];
- "paper" (the paper-era commit 9a08306): per-slice 2/98 percentile crop (skimage `rescale_intensity`)
  followed by histogram equalisation (skimage `equalize_hist`, 256 bins).
Both are reimplemented here in numpy, together with imsave's byte rule, so training, backend and tests share
one definition. Arithmetic is float64, as in upstream's MSD/ABD path (nibabel `get_fdata`).

Slices are model-view slices [R, C] (see `geometry`): orientation is not this module's business.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError

WINDOW_HU = (-150.0, 250.0)
VARIANTS = ("window", "paper")

# imsave's gray colormap is a 256-entry table of floats close to idx/255; converting it to bytes truncates
# (lut * 255).astype(uint8), and float rounding puts these 24 entries just below the integer, so their
# byte is idx - 1. Checked against matplotlib 3.7.0 and 3.11.
_ONE_LOWER_INDICES = (
    33, 37, 41, 45, 49, 53, 57, 61, 66, 74, 82, 90,
    98, 106, 114, 122, 132, 148, 164, 180, 196, 212, 228, 244,
)  # fmt: skip
_GRAY_BYTES = np.arange(256, dtype=np.uint8)
_GRAY_BYTES[list(_ONE_LOWER_INDICES)] -= 1
_GRAY_BYTES.setflags(write=False)


class IntensityError(UserError, ValueError):
    """A slice or rescale parameter cannot be turned into an image (wrong shape, NaN/inf, bad variant)."""


def hu_slice_to_gray(slice_hu: np.ndarray, variant: str = "window") -> np.ndarray:
    """HU slice [R, C] -> uint8 [R, C], byte-identical to upstream's saved PNG (any channel of it)."""
    hu = _checked_slice(slice_hu)  # float64 [R, C]
    if variant == "window":
        scaled = window_hu(hu)
    elif variant == "paper":
        scaled = paper_contrast(hu)
    else:
        raise IntensityError(f"Unknown intensity variant {variant!r}; use one of {VARIANTS}.")
    return matplotlib_gray_bytes(scaled)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """uint8 [R, C] -> uint8 [R, C, 3] with R = G = B (upstream reads its RGBA PNGs as RGB)."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise IntensityError(f"Expected a uint8 [rows, columns] image, got {gray.dtype} {gray.shape}.")
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def hu_slice_to_rgb(slice_hu: np.ndarray, variant: str = "window") -> np.ndarray:
    """HU slice [R, C] -> uint8 [R, C, 3], the image the model is given."""
    return gray_to_rgb(hu_slice_to_gray(slice_hu, variant))


def apply_rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """DICOM stored values -> HU (`stored * RescaleSlope + RescaleIntercept`), float32, any shape."""
    slope, intercept = float(slope), float(intercept)
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
        raise IntensityError(
            f"Invalid DICOM rescale (slope {slope}, intercept {intercept}): the slope must be a nonzero "
            "finite number and the intercept finite; check the series' RescaleSlope/RescaleIntercept tags."
        )
    return (np.asarray(stored, dtype=np.float64) * slope + intercept).astype(np.float32)


def window_hu(hu: np.ndarray, window: tuple[float, float] = WINDOW_HU) -> np.ndarray:
    """Upstream HEAD: clip to the HU window and scale to [0, 1] (float64, same shape)."""
    lower, upper = window
    return (np.clip(hu, lower, upper) - lower) / (upper - lower)


def paper_contrast(hu: np.ndarray) -> np.ndarray:
    """Paper era: 2/98 percentile crop then histogram equalisation, per slice (float64 [R, C])."""
    p2, p98 = np.percentile(hu, (2, 98))  # numpy's default linear interpolation, as upstream
    return _equalize_hist(_rescale_intensity(hu, float(p2), float(p98)), nbins=256)


def matplotlib_gray_bytes(values: np.ndarray) -> np.ndarray:
    """imsave(cmap="gray") bytes of a float image [R, C]: per-image min-max, 256 levels, the gray table."""
    lowest, highest = float(values.min()), float(values.max())
    if lowest == highest:
        return np.zeros(values.shape, dtype=np.uint8)  # matplotlib's Normalize fills a constant image with 0
    normalised = (values - lowest) / (highest - lowest)  # [R, C] in [0, 1]
    index = np.minimum((normalised * 256).astype(np.int64), 255)  # 1.0 belongs to the top level
    return _GRAY_BYTES[index]


def _rescale_intensity(image: np.ndarray, in_min: float, in_max: float) -> np.ndarray:
    """skimage `rescale_intensity(image, in_range=(in_min, in_max))` for a float64 image.

    The default out_range "dtype" is [-1, 1] for floats, narrowed to [0, 1] when in_min >= 0. Values are
    clipped to the input range first; an empty input range returns the clipped image clipped to the output range.
    """
    out_min, out_max = (0.0 if in_min >= 0 else -1.0), 1.0
    clipped = np.clip(image, in_min, in_max)
    if in_min == in_max:
        return np.clip(clipped, out_min, out_max)
    return (clipped - in_min) / (in_max - in_min) * (out_max - out_min) + out_min


def _equalize_hist(image: np.ndarray, nbins: int) -> np.ndarray:
    """skimage `equalize_hist(image, nbins)` for a float64 image.

    A `nbins`-bin histogram over the image's own [min, max] (numpy's rule, which widens a constant image
    to value +- 0.5), its cumulative sum divided by the pixel count, and every pixel mapped through that
    cdf by linear interpolation at the bin centres (np.interp clamps outside the first/last centre).
    """
    counts, edges = np.histogram(image.ravel(), bins=nbins)  # [nbins], [nbins + 1]
    centres = (edges[:-1] + edges[1:]) / 2.0
    cumulative = counts.cumsum()
    cdf = cumulative / float(cumulative[-1])
    return np.interp(image.ravel(), centres, cdf).reshape(image.shape)


def _checked_slice(slice_hu: np.ndarray) -> np.ndarray:
    """Validate a 2D finite slice; return it as float64 [R, C]."""
    hu = np.asarray(slice_hu)
    if hu.ndim != 2 or hu.size == 0:
        raise IntensityError(f"Expected one 2D slice [rows, columns], got shape {hu.shape}.")
    if not (np.issubdtype(hu.dtype, np.number) and not np.issubdtype(hu.dtype, np.complexfloating)):
        raise IntensityError(f"Expected real HU values, got dtype {hu.dtype}.")
    hu = hu.astype(np.float64)
    if not np.all(np.isfinite(hu)):
        bad = int(np.count_nonzero(~np.isfinite(hu)))
        raise IntensityError(
            f"The slice has {bad} NaN or infinite values; fill them (e.g. with -1024 HU, air) before preprocessing."
        )
    return hu
