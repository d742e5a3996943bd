"""A second, closer look: ask again on a close-up of the slice round the first answer's box.

Why: a small model reads a small image (the demo model 128 px, where the pancreas spans 6-20 px), and its boxes
are off mostly in their centre, not their size. Cut out a window `zoom` times smaller than the slice round the
first box and ask again: the engine enlarges the window to the model's input, so the gland is seen at `zoom`
times the detail. A model folder says whether it was trained for this (`inference.close_up_zoom` in its manifest:
the demo cascade trains on close-ups drawn the same way, `training.augment`); upstream's MiniGPT-Pancreas was
not, and is asked once.

The window keeps the slice's aspect (so the model sees the same stretch as on the whole slice), is centred on the
box and moved back inside the slice where it would cross an edge. Boxes found in it are moved back to the slice's
pixels; answers keep the model's words, which are about the window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backend import prompts

MIN_ZOOM, MAX_ZOOM = 1.0, 4.0
MIN_WINDOW_PIXELS = 8  # a tiny slice is not cut below what a slice may be (backend.volume_files)
PANCREAS_QUESTION = prompts.refer_eval_instruction(prompts.PANCREAS_PHRASE)  # the first look


def asked_closer(phrase: str | None) -> bool:
    """Whether a question about `phrase` (None: tumour yes/no, which has none) is asked of a close-up; training
    draws close-ups for the same questions (`training.data`)."""
    return phrase in (None, prompts.PANCREAS_PHRASE, prompts.TUMOR_PHRASE)


@dataclass(frozen=True)
class Window:
    """Pixel rows [row0, row1) and columns [col0, col1) of a slice."""

    row0: int
    col0: int
    row1: int
    col1: int

    def crop(self, slice_2d: np.ndarray) -> np.ndarray:
        return slice_2d[self.row0:self.row1, self.col0:self.col1]

    def to_slice(self, result):
        """A `backend.answers.SliceResult` about the window, its boxes moved to the slice's pixels."""
        moved = tuple(dataclasses.replace(b, box=(b.box[0] + self.col0, b.box[1] + self.row0,
                                                  b.box[2] + self.col0, b.box[3] + self.row0)) for b in result.boxes)
        return dataclasses.replace(result, boxes=moved)

    def as_list(self) -> list[int]:
        return [self.col0, self.row0, self.col1, self.row1]  # x, y, x, y as boxes are written


def window_round(box: tuple[float, float, float, float], rows: int, cols: int, zoom: float) -> Window:
    """The window `zoom` times smaller than a rows x cols slice, centred on `box` (x_min, y_min, x_max, y_max in
    pixels) as far as the slice allows."""
    if not MIN_ZOOM <= zoom <= MAX_ZOOM:
        raise ValueError(f"close-up zoom must be from {MIN_ZOOM} to {MAX_ZOOM}, got {zoom}")
    starts = []
    for low, high, side in ((box[1], box[3], rows), (box[0], box[2], cols)):
        length = min(side, max(MIN_WINDOW_PIXELS, round(side / zoom)))
        start = round((low + high + 1) / 2 - length / 2)  # +1: pixel indices of the box's ends, inclusive
        starts.append((min(max(start, 0), side - length), length))
    (row0, height), (col0, width) = starts
    return Window(row0, col0, row0 + height, col0 + width)


def answer_closer(ask: Callable[[list, str], list], slices: Sequence[np.ndarray], prompt: str,
                  zoom: float | None) -> list:
    """`ask(slices, prompt)`'s answers; with a zoom, a question of `prompts.CLOSE_UP_QUESTIONS` is asked of the
    close-ups round the boxes of `ask(slices, <the pancreas question>)`, its boxes moved back to the slices."""
    if not zoom or prompt.strip() not in prompts.CLOSE_UP_QUESTIONS:
        return ask(list(slices), prompt)
    windows, crops = close_ups(ask(list(slices), PANCREAS_QUESTION), slices, zoom)
    return in_slices(windows, ask(crops, prompt))


def close_ups(first_looks: Sequence, images: Sequence[np.ndarray], zoom: float
              ) -> tuple[list[Window | None], list[np.ndarray]]:
    """(the window round each first answer's first box, the images cut to them); where an answer has no box, None
    and the whole image."""
    windows = [window_round(r.boxes[0].box, *image.shape[:2], zoom) if r.boxes else None
               for r, image in zip(first_looks, images)]
    return windows, [w.crop(image) if w else image for w, image in zip(windows, images)]


def in_slices(windows: Sequence[Window | None], results: Sequence) -> list:
    """Each result about a window with its boxes moved to its slice's pixels (results about a whole slice as given)."""
    return [w.to_slice(r) if w else r for w, r in zip(windows, results)]
