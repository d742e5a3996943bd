"""Box and yes/no metrics: upstream's three historical protocols (E1/E2/E3) and our strict one, each labelled.

This module scores whole answer sets into reports (detection, sample-weighted combining, yes/no) and is the
public face of the metrics: it re-exports the per-box pieces defined in `metrics_boxes`. Box conventions
(pixel frame, inclusive truth boxes, absent truths) are described there. Rates are fractions in 0..1;
`format()` prints them x100 as upstream's logs do.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

from .grammar import GrammarError, check_image_size, parse_yes_no
from .metrics_boxes import (
    Convention,
    MetricsError,
    SampleScore,
    Variant,
    box_dice,
    box_iou,
    checked_truth,
    is_hit,
    score_sample,
)

__all__ = [
    "CombinedReport",
    "Convention",
    "DetectionReport",
    "MetricsError",
    "SampleScore",
    "Variant",
    "YesNoReport",
    "box_dice",
    "box_iou",
    "combine_weighted",
    "evaluate_detection",
    "evaluate_yes_no",
    "is_hit",
    "weighted_mean",
]


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
