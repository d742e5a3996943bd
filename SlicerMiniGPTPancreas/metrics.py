"""Box and yes/no metrics: upstream's three historical protocols (E1/E2/E3) and our strict one, each labelled.

Per box: IoU / Dice under two conventions, a hit under each variant, one answer decoded and scored against its
truth (`score_sample`). Per set: detection reports, sample-weighted combining, yes/no reports. All box numbers
live in the pixel frame of the W x H slice (docs/upstream.md 6.1). Ground truth boxes are inclusive pixel indices
(x_min, y_min, x_max, y_max), x = column; None or (0, 0, 0, 0) means "absent" (balanced sets). Rates are
fractions in 0..1; `format()` prints them x100 as upstream's logs do.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Literal, Sequence

from .errors import UserError
from .grammar import Box, GrammarError, check_image_size, grid_to_pixels, parse_answer, parse_yes_no

Convention = Literal["continuous", "plus_one"]


class MetricsError(UserError, ValueError):
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


# ------------------------------------------------------------------------------------------- detection

@dataclass
class DetectionReport:
    """Box-detection results of one variant. Rates are fractions; `n_scored` is the IoU mean's denominator."""

    variant: str
    description: str
    balanced: bool
    decoding: str
    n: int
    n_failed: int
    n_missing: int
    n_scored: int
    mean_iou: float
    mean_dice: float
    hits: int
    hit_rate: float  # hits / n_scored
    detection_accuracy: float  # hits / n, upstream's "Detection Accuracy"
    parse_failure_rate: float
    tp: int | None = None
    tn: int | None = None
    fp: int | None = None
    fn: int | None = None
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    specificity: float | None = None  # TN / (TN + FP): empty slices called empty
    npv: float | None = None  # TN / (TN + FN): "nothing there" answers that are right
    f1: float | None = None
    samples: list[SampleScore] = field(default_factory=list, repr=False)

    def as_dict(self, include_samples: bool = False) -> dict:
        """Plain dict for JSON; per-sample scores only on request."""
        data = asdict(self)
        if not include_samples:
            data.pop("samples")
        return data

    def format(self) -> str:
        """A short human summary, percentages as in upstream's logs."""
        lines = [f"[{self.variant}] {self.description} ({self.decoding})",
                 f"  n={self.n}: mean IoU {100 * self.mean_iou:.2f}, mean Dice {100 * self.mean_dice:.2f} "
                 f"(over {self.n_scored}), detection accuracy {100 * self.detection_accuracy:.2f}%, "
                 f"hit rate {100 * self.hit_rate:.2f}%, failed answers {self.n_failed} "
                 f"({100 * self.parse_failure_rate:.2f}%, {self.n_missing} missing)"]
        if self.balanced:
            lines.append(f"  balanced: TP {self.tp} TN {self.tn} FP {self.fp} FN {self.fn}; accuracy "
                         f"{100 * self.accuracy:.2f}%, precision {100 * self.precision:.2f}%, "
                         f"recall {100 * self.recall:.2f}%, specificity {100 * self.specificity:.2f}%, "
                         f"NPV {100 * self.npv:.2f}%, F1 {100 * self.f1:.2f}%")
        return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0  # upstream and sklearn zero_division=0


def _check_inputs(predictions: Sequence, truths: Sequence, sizes: Sequence | None) -> int:
    lengths = {"predictions": len(predictions), "truths": len(truths)}
    if sizes is not None:
        lengths["sizes"] = len(sizes)
    if len(set(lengths.values())) != 1:
        raise MetricsError(f"inputs must have one entry per sample, got lengths {lengths}")
    if not predictions:
        raise MetricsError("nothing to evaluate: no samples were given")
    return len(predictions)


def evaluate_detection(predictions: Sequence[str | None], truths: Sequence[Sequence[float] | None],
                       sizes: Sequence[tuple[int, int]], variant: Variant | str = Variant.STRICT, *,
                       balanced: bool | None = None, scale: float | None = None) -> DetectionReport:
    """Score box answers against truth boxes on W x H slices (`sizes` holds (W, H) per sample).

    balanced: None = True iff some truth is absent. Balanced sets classify each sample TP/TN/FP/FN (zero box =
    absent) and average IoU over TP (E2/E3, failed answers skipped as upstream does) or over every sample whose
    truth is present (STRICT, failures count 0). E1 has no balanced rule and refuses such sets.
    scale: upstream's ABD protocol decodes with a fixed factor (5.12, i.e. 512-px images) instead of W/100, H/100;
    only E1/E2/E3 accept it.
    """
    _check_inputs(predictions, truths, sizes)
    try:
        variant = Variant(variant)
        checked_sizes = [check_image_size(*size) for size in sizes]
    except (GrammarError, TypeError, ValueError) as error:
        raise MetricsError(f"bad variant or image size: {error}") from error
    truth_boxes = [checked_truth(box, size, i) for i, (box, size) in enumerate(zip(truths, checked_sizes))]
    any_absent = any(box is None for box in truth_boxes)
    balanced = any_absent if balanced is None else bool(balanced)
    if any_absent and not balanced:
        raise MetricsError("some truths are absent (None or the zero box) but balanced=False; "
                           "pass balanced=True (or None) for sets with empty slices")
    if balanced and variant is Variant.E1:
        raise MetricsError("E1 (paper era) had no balanced-set rule; use E2, E3 or STRICT for balanced sets")
    if scale is not None and (variant is Variant.STRICT or not scale > 0):
        raise MetricsError("scale is upstream's ABD factor (5.12) for E1/E2/E3; STRICT uses each image's size")
    samples = [score_sample(i, answer, truth, size, variant, balanced, scale)
               for i, (answer, truth, size) in enumerate(zip(predictions, truth_boxes, checked_sizes))]
    return _summarise(samples, variant, balanced, scale)


def _summarise(samples: list[SampleScore], variant: Variant, balanced: bool,
               scale: float | None) -> DetectionReport:
    n = len(samples)
    scored = [s for s in samples if s.iou is not None]
    hits = sum(s.hit for s in samples)
    failed = sum(s.failure is not None for s in samples)
    decoding = ("cell centre" if variant is Variant.STRICT
                else f"floor, g * {scale}" if scale is not None else "floor, g / 100 * size")
    report = DetectionReport(
        variant=variant.value, description=variant.description, balanced=balanced, decoding=decoding, n=n,
        n_failed=failed, n_missing=sum(s.failure == "missing prediction" for s in samples),
        n_scored=len(scored), mean_iou=_ratio(sum(s.iou for s in scored), len(scored)),
        mean_dice=_ratio(sum(s.dice for s in scored), len(scored)), hits=hits,
        hit_rate=_ratio(hits, len(scored)), detection_accuracy=hits / n, parse_failure_rate=failed / n,
        samples=samples)
    if balanced:
        counts = {name: sum(s.outcome == name.upper() for s in samples) for name in ("tp", "tn", "fp", "fn")}
        precision = _ratio(counts["tp"], counts["tp"] + counts["fp"])
        recall = _ratio(counts["tp"], counts["tp"] + counts["fn"])
        report.tp, report.tn, report.fp, report.fn = counts["tp"], counts["tn"], counts["fp"], counts["fn"]
        report.accuracy = _ratio(counts["tp"] + counts["tn"], sum(counts.values()))
        report.precision, report.recall = precision, recall
        report.specificity = _ratio(counts["tn"], counts["tn"] + counts["fp"])
        report.npv = _ratio(counts["tn"], counts["tn"] + counts["fn"])
        report.f1 = _ratio(2 * precision * recall, precision + recall)
    return report


# ------------------------------------------------------------------------------------ combining datasets

def weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
    """Sample-weighted mean sum(value * n) / sum(n), upstream's NIH+MSD "weighted" combination."""
    if len(values) != len(counts) or not counts or sum(counts) <= 0:
        raise MetricsError(f"need one positive count per value, got values={values!r} counts={counts!r}")
    return sum(v * c for v, c in zip(values, counts)) / sum(counts)


@dataclass
class CombinedReport:
    """Sample-weighted combination of several datasets' reports of one variant (weights = each report's n)."""

    variant: str
    n: int
    counts: list[int]
    metrics: dict[str, float]

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    def format(self) -> str:
        """One line per metric, percentages as upstream prints them."""
        parts = ", ".join(f"{name} {100 * value:.2f}" for name, value in self.metrics.items())
        return f"[{self.variant}] weighted over {len(self.counts)} sets (n={self.counts}): {parts}"


_COMBINED = ("mean_iou", "mean_dice", "hit_rate", "detection_accuracy", "parse_failure_rate")
_COMBINED_BALANCED = ("accuracy", "precision", "recall", "specificity", "npv", "f1")


def combine_weighted(reports: Sequence[DetectionReport]) -> CombinedReport:
    """Combine per-dataset reports (e.g. NIH and MSD) as sum(metric * n) / sum(n)."""
    if not reports:
        raise MetricsError("no reports to combine")
    if len({(r.variant, r.balanced, r.decoding) for r in reports}) != 1:
        raise MetricsError("reports of different variants, decodings or balanced settings cannot be combined")
    names = _COMBINED + (_COMBINED_BALANCED if reports[0].balanced else ())
    counts = [r.n for r in reports]
    metrics = {name: weighted_mean([getattr(r, name) for r in reports], counts) for name in names}
    return CombinedReport(reports[0].variant, sum(counts), counts, metrics)


# ------------------------------------------------------------------------------------------------ yes/no

@dataclass
class YesNoReport:
    """Yes/no classification results; positive label "yes", ratios 0 when their denominator is 0."""

    rule: str
    description: str
    n: int
    n_unparsed: int
    tp: int
    tn: int
    fp: int
    fn: int
    accuracy: float
    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    def format(self) -> str:
        """A short human summary."""
        return (f"[yes/no, {self.rule}] {self.description}\n  n={self.n}: accuracy {100 * self.accuracy:.2f}%, "
                f"precision {100 * self.precision:.2f}%, recall {100 * self.recall:.2f}%, F1 {100 * self.f1:.2f}%"
                f" (TP {self.tp} TN {self.tn} FP {self.fp} FN {self.fn}, unparsed {self.n_unparsed})")


_YES_NO_RULES = {
    "upstream": "eval_TC.py: anything but exactly 'yes'/'no' (after lower/strip) counts as 'no'",
    "strict": "case, spaces and punctuation ignored; an answer that is neither yes nor no counts as wrong",
}


def _truth_yes(truth: object, rule: str, index: int) -> bool:
    if isinstance(truth, bool):
        return truth
    value = parse_yes_no(truth, rule=rule)  # type: ignore[arg-type]
    if value is None:
        raise MetricsError(f"truth {index} ({truth!r}) is neither 'yes' nor 'no'")
    return value


def evaluate_yes_no(predictions: Sequence[str | None], truths: Sequence[str | bool],
                    rule: Literal["strict", "upstream"] = "strict") -> YesNoReport:
    """Accuracy, precision, recall and F1 of yes/no answers (sklearn semantics, pos_label "yes",
    zero_division 0). Under "strict" an unparseable answer is a miss: FN if the truth is yes, FP if no."""
    if rule not in _YES_NO_RULES:
        raise MetricsError(f"unknown yes/no rule {rule!r}; use 'strict' or 'upstream'")
    n = _check_inputs(predictions, truths, None)
    tp = tn = fp = fn = unparsed = 0
    for index, (answer, truth) in enumerate(zip(predictions, truths)):
        truth_yes = _truth_yes(truth, rule, index)
        said_yes = parse_yes_no(answer, rule=rule)
        if said_yes is None:
            unparsed += 1
            said_yes = not truth_yes  # never right
        tp += said_yes and truth_yes
        tn += not said_yes and not truth_yes
        fp += said_yes and not truth_yes
        fn += not said_yes and truth_yes
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return YesNoReport(rule, _YES_NO_RULES[rule], n, unparsed, tp, tn, fp, fn, (tp + tn) / n, precision,
                       recall, _ratio(2 * tp, 2 * tp + fp + fn))
