"""Boxes drawn on model-view slices, enlarged for viewing (the PNG overlays of `demo` and `predict`).

A box is (x_min, y_min, x_max, y_max) in pixel INDEX coordinates of the slice (pixel centres at integers, the
max inclusive), so its outline runs along the outer edges of its first and last pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

OVERLAY_SIDE = 512  # small slices are enlarged by a whole factor (nearest neighbour) to about this many pixels
TRUTH_COLOR = (0, 220, 0)
PREDICTION_COLOR = (230, 0, 0)


class OverlayBox(NamedTuple):
    box: Sequence[float]  # (x_min, y_min, x_max, y_max), index coordinates of the slice
    color: tuple[int, int, int]
    caption: str | None = None  # drawn just above the box (inside it when the box touches the top)


def draw_overlay(slice_image: np.ndarray | Image.Image, boxes: Sequence[OverlayBox],
                 side: int = OVERLAY_SIDE) -> Image.Image:
    """The slice (uint8 [R, C, 3] or a PIL image) enlarged to about `side` pixels, with the boxes outlined."""
    image = slice_image.convert("RGB") if isinstance(slice_image, Image.Image) else Image.fromarray(
        np.asarray(slice_image, dtype=np.uint8), mode="RGB")
    zoom = max(1, side // max(image.size))
    image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    for item in boxes:
        x0, y0, x1, y1 = (float(v) for v in item.box)
        # Pixel x spans [x, x + 1) in image coordinates, so an inclusive index box ends at (x1 + 1) * zoom - 1.
        outline = [x0 * zoom, y0 * zoom, (x1 + 1) * zoom - 1, (y1 + 1) * zoom - 1]
        draw.rectangle(outline, outline=item.color)
        if item.caption:
            _draw_caption(draw, item.caption, outline, item.color)
    return image


def _draw_caption(draw: ImageDraw.ImageDraw, text: str, outline: list[float], color: tuple[int, int, int]) -> None:
    left, top = outline[0], outline[1]
    _, text_top, _, text_bottom = draw.textbbox((0, 0), text)
    height = text_bottom - text_top + 2
    y = top - height if top >= height else top + 2
    draw.text((left + 1, y), text, fill=color)
