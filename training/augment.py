"""Geometric augmentation for training: zoom and shift a slice, and move its answer's boxes with it.

Why: a demo dataset holds a few hundred slices per task, and a model trained from scratch on them learns the
slices by heart instead of learning to read where an organ is (after 3000 steps of stage 0 its box digits were
right on training slices and at chance on held-out ones). Real scans also differ in field of view and patient
position far more than any fixed set shows. A random zoom (the body fills more or less of the frame) and shift
(the body sits elsewhere) of every example makes each box position new, so only reading the image pays.

The transform is applied to the slice PNG before `preprocess_image`, and the boxes are moved by the same map:
decoded to pixel boxes (cell centres), mapped, and rendered again with the upstream grammar. A draw that would
push a box out of the frame is redrawn (then left out), so no answer ever describes a cut structure. Areas
uncovered by a zoom-out are black, as air outside the field of view is after the CT window. Yes/no answers and
the absent box are unchanged. Left-right flips are not used: they would teach impossible anatomy.

A share (`focus`) of the examples given a pancreas box to look round (`training.data` gives it for the questions
asked of a close-up at inference: pancreas, tumour, tumour yes/no) is drawn as a close-up instead: zoomed
1.5-2.5x round the slice's pancreas, its centre moved off the gland by up to `focus_jitter` of the side. Why: the
model reads a 128 px image, where the pancreas spans 6-20 px, and its boxes are off mostly in their centre (on
the previous demo model's test slices, a box of the predicted size at the true centre would have scored IoU 0.64,
its boxes 0.47). Asked again of a close-up round its first box (`backend.close_up`), a model that has seen
close-ups sees the gland at twice the detail. The jitter is larger than the first answer's error, so a close-up
never teaches "the gland is in the middle". A close-up that would cut a box of the example falls back to the
plain draw.

The grey levels then pass through a random monotone curve (`adjust_intensity`): the window's ends move and a
gamma bends what lies between. Why: a model trained on one scanner's (or one phantom generator's) grey levels
reads organs by their exact brightness. Measured on the demo model trained without it, a gamma of 1.5 on the
test slices dropped the pancreas IoU from 0.64 to 0.40, and a contrast of 0.7 to 0.47; real scans differ in
contrast phase, kernel and window at least that much. The curve is monotone, so what is darker stays darker (a
hypo-attenuating tumour stays visible) and no answer changes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from SlicerMiniGPTPancreas import grammar

_TRIES = 10  # draws before an example is used as it is


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random maps: zoom factor (>1 enlarges), shift (a fraction of the side, each axis), how far
    each end of the grey range may move (a fraction of it) and the gamma (drawn log-uniformly)."""

    zoom: tuple[float, float] = (0.8, 1.25)
    shift: float = 0.12
    window: float = 0.2
    gamma: tuple[float, float] = (0.67, 1.5)
    focus: float = 0.0  # share of examples drawn as a close-up round the pancreas (where the slice has one)
    focus_zoom: tuple[float, float] = (1.5, 2.5)
    focus_jitter: float = 0.1  # how far the close-up's centre may sit off the gland's, a fraction of the side


def augment_example(image: Image.Image, answers: Sequence[str], settings: Augmentation,
                    rng: random.Random, focus_answer: str | None = None) -> tuple[Image.Image, list[str]]:
    """(image, answers) zoomed and shifted together: the trained answer and any other boxes of the same slice (the
    patch-grounding targets) move under one draw; unchanged when no draw keeps every box inside. focus_answer:
    the slice's pancreas box answer, round which a `settings.focus` share of the draws is a close-up."""
    parsed = [grammar.parse_answer(answer) for answer in answers]
    if any(p.kind not in ("boxes", "yes_no") for p in parsed):
        return image, list(answers)
    width, height = image.size
    boxes = [[grammar.grid_to_pixels(box, width, height) for box in p.grid_boxes if not box.is_absent]
             for p in parsed]
    focus = _focus_box(focus_answer, width, height) if settings.focus > 0 else None
    close_up = focus is not None and rng.random() < settings.focus
    for attempt in range(_TRIES):  # a close-up that cuts a box (a liver asked) falls back to the plain draw
        zoom, shift = (_close_up(focus, settings, width, height, rng) if close_up and attempt < _TRIES // 2
                       else _draw(settings, width, height, rng))
        moved = [[_map_box(box, zoom, shift, width, height) for box in each] for each in boxes]
        if not all(_inside(box, width, height) for each in moved for box in each):
            continue
        rewritten = [_rewrite(*args, width, height) for args in zip(answers, parsed, moved)]
        if None not in rewritten:
            return _warp(image, zoom, shift), rewritten
    return image, list(answers)


def _draw(settings: Augmentation, width: int, height: int, rng: random.Random) -> tuple[float, tuple[float, float]]:
    zoom = rng.uniform(*settings.zoom)
    return zoom, (rng.uniform(-settings.shift, settings.shift) * width,
                  rng.uniform(-settings.shift, settings.shift) * height)


def _close_up(box: tuple[float, float, float, float], settings: Augmentation, width: int, height: int,
              rng: random.Random) -> tuple[float, tuple[float, float]]:
    """(zoom, shift) of a view `zoom` times closer whose centre is the box's, moved by the jitter and kept where
    the view lies inside the slice (as `backend.close_up` cuts its window at inference)."""
    zoom = rng.uniform(*settings.focus_zoom)
    shift = []
    for low, high, side in ((box[0], box[2], width), (box[1], box[3], height)):
        half_view = (side - 1) / (2 * zoom)
        centre = (low + high) / 2 + rng.uniform(-settings.focus_jitter, settings.focus_jitter) * side
        centre = min(max(centre, half_view), side - 1 - half_view)
        shift.append(-zoom * (centre - (side - 1) / 2))  # _map_box sends `centre` to the frame's centre
    return zoom, (shift[0], shift[1])


def _focus_box(answer: str | None, width: int, height: int) -> tuple[float, float, float, float] | None:
    parsed = grammar.parse_answer(answer) if answer else None
    present = [box for box in parsed.grid_boxes if not box.is_absent] if parsed else []
    return grammar.grid_to_pixels(present[0], width, height) if present else None


def adjust_intensity(image: Image.Image, settings: Augmentation, rng: random.Random) -> Image.Image:
    """`image` through a grey-level curve (`apply_grey_curve`) drawn from `settings`."""
    if not settings.window and settings.gamma == (1.0, 1.0):
        return image
    low = rng.uniform(-settings.window, settings.window)
    high = 1.0 + rng.uniform(-settings.window, settings.window)
    gamma = math.exp(rng.uniform(math.log(settings.gamma[0]), math.log(settings.gamma[1])))
    return apply_grey_curve(image, GreyCurve(low, high, gamma))


@dataclass(frozen=True)
class GreyCurve:
    """v -> clip((v - low) / (high - low), 0, 1) ** gamma on grey levels as fractions (0 black, 1 white)."""

    low: float = 0.0
    high: float = 1.0
    gamma: float = 1.0


def apply_grey_curve(image: Image.Image, curve: GreyCurve) -> Image.Image:
    """`image` (any band count) with every band's levels through `curve`."""
    span = curve.high - curve.low
    table = [round(255 * min(1.0, max(0.0, (level / 255 - curve.low) / span)) ** curve.gamma) for level in range(256)]
    return image.point(table * len(image.getbands()))


def _map_box(box: tuple[float, float, float, float], zoom: float, shift: tuple[float, float],
             width: int, height: int) -> tuple[float, float, float, float]:
    """The box under p -> zoom * (p - centre) + centre + shift (pixel index coordinates)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    x1, y1, x2, y2 = box
    return (zoom * (x1 - cx) + cx + shift[0], zoom * (y1 - cy) + cy + shift[1],
            zoom * (x2 - cx) + cx + shift[0], zoom * (y2 - cy) + cy + shift[1])


def _inside(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    x1, y1, x2, y2 = box
    return 0 <= x1 and 0 <= y1 and x2 <= width - 1 and y2 <= height - 1


def _warp(image: Image.Image, zoom: float, shift: tuple[float, float]) -> Image.Image:
    """Resample the image under the same map: PIL's AFFINE takes the inverse (output pixel -> input pixel)."""
    cx, cy = (image.width - 1) / 2, (image.height - 1) / 2
    inverse = (1 / zoom, 0.0, cx - (cx + shift[0]) / zoom, 0.0, 1 / zoom, cy - (cy + shift[1]) / zoom)
    fill = 0 if image.mode in ("L", "I", "F") else (0,) * len(image.getbands())
    return image.transform(image.size, Image.Transform.AFFINE, inverse, resample=Image.Resampling.BILINEAR,
                           fillcolor=fill)


def _rewrite(answer: str, parsed: grammar.ParsedAnswer, moved: list[tuple[float, float, float, float]],
             width: int, height: int) -> str | None:
    """The answer with each present box's "{<..>}" replaced, in order, by its moved box; None if unsure."""
    if not moved:
        return answer
    pieces, rest = [], answer
    for old, new in zip((box for box in parsed.grid_boxes if not box.is_absent), moved):
        old_text = "{" + "".join(f"<{v}>" for v in old.as_tuple()) + "}"
        head, found, rest = rest.partition(old_text)
        if not found:  # an answer spelled unlike the renderer's form: keep the example as it is
            return None
        pieces += [head, grammar.render_box(_rounded(new), width, height)]
    return "".join(pieces) + rest


def _rounded(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(int(round(v)) for v in box)  # inclusive pixel indices, as prepare renders them
