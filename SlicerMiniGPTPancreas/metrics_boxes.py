"""Per-box metric pieces: IoU/Dice conventions, the protocol variants, decoding one answer and scoring one sample.

`metrics` builds the set-level reports on these and re-exports the public names: import them from `metrics`.
All box numbers live in the pixel frame of the W x H slice (docs/upstream.md 6.1). Ground truth boxes are
inclusive pixel indices (x_min, y_min, x_max, y_max), x = column; None or (0, 0, 0, 0) means "absent" (balanced
sets).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Sequence

from .grammar import Box, grid_to_pixels, parse_answer

Convention = Literal["continuous", "plus_one"]


class MetricsError(ValueError):
    """Inputs that cannot be scored (mismatched lengths, malformed truth boxes, contradictory options)."""


class Variant(str, Enum):
    """Which evaluation protocol produced a number (docs/upstream.md 6.1; STRICT is ours)."""

    E1 = "E1"  # paper era: +1 IoU, hit IoU > 0.5, means over ALL samples (failures 0); no balanced-set rule
    E2 = "E2"  # continuous IoU, hit >= 0.5, means over all samples; balanced: TP/TN/FP/FN, IoU over TP only
    E3 = "E3"  # HEAD: as E2 but means over PARSED samples only; detection accuracy still hits / all samples
    STRICT = "STRICT"  # ours: cell-centre decoding, IoU of the pixels' extent, failures are IoU 0 everywhere

    @property
    def description(self) -> str:
        """One line saying how this variant scores."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Variant.E1: "upstream paper era: +1 IoU, floor decoding, hit IoU > 0.5, mean over all samples",
    Variant.E2: "upstream E2: continuous IoU, floor decoding, hit >= 0.5, mean over all samples (balanced: TP)",
    Variant.E3: "upstream HEAD: continuous IoU, floor decoding, hit >= 0.5, mean over parsed answers only",
    Variant.STRICT: "strict: IoU of pixel extents, cell-centre decoding, hit >= 0.5, failed answers count as IoU 0",
}


# ---------------------------------------------------------------------------------------------- box overlap

def _overlap(a: Sequence[float], b: Sequence[float], plus: float) -> tuple[float, float, float]:
    """(intersection, area a, area b) with upstream's formulas; plus = 1 for the +1 convention, else 0.

    Continuous (E2/E3 evaluate_predictions.py): areas clamp each side at 0. +1 (eval_utils.computeIoU): areas
    are not clamped, so swapped boxes give upstream's odd values - reproduced, not repaired.
    """
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + plus)
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + plus)
    if plus:
        area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
        area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    else:
        area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
        area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    return inter_w * inter_h, area_a, area_b


def _raw_iou_dice(a: Sequence[float], b: Sequence[float], convention: Convention) -> tuple[float, float]:
    """IoU and Dice without input checks; an undefined ratio (zero union) scores 0, as upstream's code does."""
    inter, area_a, area_b = _overlap(a, b, 1.0 if convention == "plus_one" else 0.0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else 0.0
    dice = 2 * inter / (area_a + area_b) if area_a + area_b > 0 else 0.0
    return iou, dice


def _checked_box(box: Sequence[float], what: str) -> tuple[float, float, float, float]:
    if box is None or len(box) != 4:
        raise MetricsError(f"{what} must be 4 numbers (x_min, y_min, x_max, y_max), got {box!r}")
    values = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in values) or values[0] > values[2] or values[1] > values[3]:
        raise MetricsError(f"{what} {tuple(box)} needs finite values with x_min <= x_max and y_min <= y_max")
    return values  # type: ignore[return-value]


def _check_convention(convention: str) -> None:
    if convention not in ("continuous", "plus_one"):
        raise MetricsError(f"unknown IoU convention {convention!r}; use 'continuous' or 'plus_one'")


def box_iou(a: Sequence[float], b: Sequence[float], convention: Convention = "continuous") -> float:
    """Intersection over union of two boxes. "continuous": areas are (x2-x1)(y2-y1); "plus_one": inclusive
    pixel counts (x2-x1+1)(y2-y1+1), which equals the IoU of the boxes' pixel extents [x1-0.5, x2+0.5]."""
    _check_convention(convention)
    return _raw_iou_dice(_checked_box(a, "box a"), _checked_box(b, "box b"), convention)[0]


def box_dice(a: Sequence[float], b: Sequence[float], convention: Convention = "continuous") -> float:
    """Box Dice 2|A n B| / (|A| + |B|), with the same area conventions as `box_iou`."""
    _check_convention(convention)
    return _raw_iou_dice(_checked_box(a, "box a"), _checked_box(b, "box b"), convention)[1]


def is_hit(iou: float, variant: Variant | str) -> bool:
    """Whether an IoU counts as a detection: E1 uses IoU > 0.5, the others IoU >= 0.5."""
    return iou > 0.5 if Variant(variant) is Variant.E1 else iou >= 0.5


# ----------------------------------------------------------------------------------- decoding predictions

_UPSTREAM_BOX = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


def _upstream_grid(answer: object, variant: Variant) -> tuple[int, ...] | None:
    """Upstream's parse: eval_ref.py cleaning + anchored regex, then the integers by re.findall.

    E1 (paper era) runs findall on the answer and keeps the FIRST four integers, so a second box after
    "<delim>" or a trailing number does not fail the answer; E2/E3 run it on str(list of answers), which reads
    the same digits, and need exactly four. Values up to 999 pass, swapped corners pass: upstream scored them
    as they were.
    """
    if not isinstance(answer, str):
        return None
    cleaned = answer.replace("<unk>", "").replace(" ", "").strip()
    if not _UPSTREAM_BOX.match(cleaned):
        return None
    if variant is Variant.E1:
        return tuple(int(i) for i in re.findall(r"\d+", cleaned)[:4])  # the anchored regex ensures four
    integers = re.findall(r"\d+", str([cleaned]))
    return tuple(int(i) for i in integers) if len(integers) == 4 else None


def _decode(answer: object, size: tuple[int, int], variant: Variant,
            scale: float | None) -> tuple[Box | None, bool, str | None]:
    """(pixel box or None, prediction says absent, failure reason or None)."""
    if answer is None:
        return None, False, "missing prediction"
    if variant is not Variant.STRICT:
        grid = _upstream_grid(answer, variant)
        if grid is None:
            return None, False, "not an upstream box answer '{<x1><y1><x2><y2>}'"
        if scale is not None:  # ABD at HEAD: a fixed factor (5.12) whatever the image size
            box = (grid[0] * scale, grid[1] * scale, grid[2] * scale, grid[3] * scale)
        else:  # upstream's float order, g / 100 * size
            width, height = size[0], size[1]
            box = (grid[0] / 100.0 * width, grid[1] / 100.0 * height, grid[2] / 100.0 * width,
                   grid[3] / 100.0 * height)
        return box, all(g == 0 for g in grid), None
    parsed = parse_answer(answer)
    if parsed.kind != "boxes":
        return None, False, parsed.reason or f"expected a box, got a {parsed.kind} answer"
    if parsed.absent:
        return None, True, None
    if len(parsed.grid_boxes) != 1:
        return None, False, f"expected one box, got {len(parsed.grid_boxes)}"
    return grid_to_pixels(parsed.grid_boxes[0], size[0], size[1], mode="center"), False, None


def checked_truth(box: Sequence[float] | None, size: tuple[int, int], index: int) -> Box | None:
    """A checked truth box in pixels, or None for absent (None or the all-zero box)."""
    if box is None:
        return None
    values = _checked_box(box, f"truth {index}")
    if values == (0.0, 0.0, 0.0, 0.0):
        return None
    if values[0] < 0 or values[1] < 0 or values[2] > size[0] or values[3] > size[1]:
        raise MetricsError(f"truth {index} {tuple(box)} lies outside its {size[0]} x {size[1]} image")
    return values


# ------------------------------------------------------------------------------------------ one sample

@dataclass
class SampleScore:
    """How one answer was scored. `iou` is None when the sample is not part of the IoU mean."""

    index: int
    failure: str | None  # why the answer could not be read as a box (None = it could)
    pred_box: Box | None  # decoded pixel box (None for failures and, under STRICT, "absent" answers)
    pred_absent: bool
    truth_absent: bool
    iou: float | None
    dice: float | None
    hit: bool
    outcome: str | None  # "TP", "TN", "FP", "FN" on balanced sets; None where the protocol skips the sample


def score_sample(index: int, answer: object, truth: Box | None, size: tuple[int, int], variant: Variant,
                 balanced: bool, scale: float | None) -> SampleScore:
    """Score answer `index` against its checked truth (None = absent) under `variant`'s rules."""
    box, pred_absent, failure = _decode(answer, size, variant, scale)
    strict = variant is Variant.STRICT
    outcome = None
    if balanced and (failure is None or strict):
        # A failed answer is never right under STRICT: FP on an empty slice, FN where the organ is present.
        predicts_present = (not pred_absent) if failure is None else truth is None
        outcome = {(True, True): "TP", (False, False): "TN", (False, True): "FP", (True, False): "FN"}[
            (truth is not None, predicts_present)]
        counted = outcome == "TP" or (strict and truth is not None)
    elif balanced:
        counted = False  # E2/E3 skip failed answers entirely on balanced sets
    else:
        counted = failure is None or variant is not Variant.E3
    iou = dice = None
    if counted:
        iou, dice = (0.0, 0.0)
        if failure is None and box is not None and truth is not None:
            # E1 and STRICT measure the pixels' real extent (an inclusive index box x0..x1 covers x1-x0+1 pixels),
            # so a one-pixel-wide truth is not scored 0; E2/E3 keep upstream's continuous formula.
            convention: Convention = "plus_one" if variant in (Variant.E1, Variant.STRICT) else "continuous"
            iou, dice = _raw_iou_dice(box, truth, convention)
    hit = iou is not None and is_hit(iou, variant)
    return SampleScore(index, failure, box, pred_absent, truth is None, iou, dice, hit, outcome)
