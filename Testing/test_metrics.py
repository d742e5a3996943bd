"""Tests of the metrics: box IoU/Dice conventions, the E1/E2/E3/STRICT protocols and yes/no scores.

Every expected number is worked out by hand in the comments (docs/upstream.md section 6).
"""

from __future__ import annotations

import pytest

from SlicerMiniGPTPancreas.metrics import (
    MetricsError,
    Variant,
    box_dice,
    box_iou,
    combine_weighted,
    evaluate_detection,
    evaluate_yes_no,
    is_hit,
    weighted_mean,
)

# ------------------------------------------------------------------------------------------- box overlap


def test_box_iou_and_dice_continuous_and_plus_one():
    a, b = (0, 0, 10, 10), (5, 5, 15, 15)
    # continuous: inter 5*5 = 25, areas 100 + 100, union 175 -> 25/175; Dice 50/200.
    assert box_iou(a, b) == pytest.approx(25 / 175)
    assert box_dice(a, b) == pytest.approx(0.25)
    # +1: inter 6*6 = 36, areas 11*11 = 121 each, union 206 -> 36/206; Dice 72/242.
    assert box_iou(a, b, "plus_one") == pytest.approx(36 / 206)
    assert box_dice(a, b, "plus_one") == pytest.approx(72 / 242)


def test_one_pixel_box_is_empty_in_continuous_but_full_in_plus_one():
    # (3,3,3,3) is one pixel: continuous area 0 -> union 0 -> IoU 0 by upstream's rule; +1 area 1 -> IoU 1.
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3), "plus_one") == 1.0
    assert box_iou((0, 0, 4, 4), (10, 10, 14, 14)) == 0.0  # disjoint


def test_box_iou_refuses_bad_boxes_and_conventions():
    with pytest.raises(MetricsError, match="x_min <= x_max"):
        box_iou((10, 0, 5, 5), (0, 0, 5, 5))
    with pytest.raises(MetricsError, match="4 numbers"):
        box_iou((0, 0, 5), (0, 0, 5, 5))
    with pytest.raises(MetricsError, match="unknown IoU convention"):
        box_iou((0, 0, 5, 5), (0, 0, 5, 5), "area")


def test_hit_threshold_is_strict_only_in_e1():
    assert not is_hit(0.5, Variant.E1) and is_hit(0.5000001, "E1")
    assert is_hit(0.5, Variant.E2) and is_hit(0.5, Variant.E3) and is_hit(0.5, Variant.STRICT)
    assert not is_hit(0.4999999, Variant.STRICT)


# ------------------------------------------------------------------------------- detection, non-balanced

# 200 x 200 slices, truth (20, 20, 60, 60) for every sample.
#  A "{<10><10><30><30>}": floor g/100*200 -> (20, 20, 60, 60), the truth itself.
#    centre: g=10 <-> x in {20, 21} -> 20.5; g=30 -> {60, 61} -> 60.5: (20.5, 20.5, 60.5, 60.5);
#    inter 39.5^2 = 1560.25, areas 1600 + 1600, union 1639.75 -> IoU 0.95152, Dice 3120.5/3200.
#  B "{<10><10><20><30>}": floor (20, 20, 40, 60): inter 20*40 = 800, areas 800 + 1600, union 1600 -> 0.5,
#    Dice 1600/2400. +1: inter 21*41 = 861, areas 861 + 41*41 = 1681, union 1681 -> 861/1681 = 0.5122.
#    centre (20.5, 20.5, 40.5, 60.5): inter 20*39.5 = 790, union 800 + 1600 - 790 = 1610 -> 790/1610 = 0.4907.
#  STRICT scores pixel extents (+1 on inclusive indices):
#    A centre: inter (60 - 20.5 + 1)^2 = 40.5^2 = 1640.25, areas 41^2 + 41^2, union 1721.75 -> 0.95266.
#    B centre: inter (40.5 - 20.5 + 1) * (60 - 20.5 + 1) = 21 * 40.5 = 850.5, areas 21*41 = 861 and 1681,
#      union 1691.5 -> 850.5/1691.5 = 0.50281 (a hit, where the continuous formula gave 0.4907).
#  C a sentence: a failed parse.
SIZE = (200, 200)
TRUTH = (20, 20, 60, 60)
A, B, C = "{<10><10><30><30>}", "{<10><10><20><30>}", "the pancreas is in the middle"
IOU_A_STRICT = 1640.25 / 1721.75
IOU_B_STRICT = 850.5 / 1691.5


def _evaluate(predictions, variant, truths=None, **options):
    truths = truths if truths is not None else [TRUTH] * len(predictions)
    return evaluate_detection(predictions, truths, [SIZE] * len(predictions), variant, **options)


def test_e1_uses_plus_one_and_counts_failures_as_zero():
    report = _evaluate([A, B, C], "E1")
    assert report.mean_iou == pytest.approx((1 + 861 / 1681 + 0) / 3)
    assert (report.hits, report.n_scored, report.n_failed) == (2, 3, 1)  # 0.5122 > 0.5 is a hit
    assert report.detection_accuracy == pytest.approx(2 / 3)


def test_e1_reads_the_first_four_integers_as_upstream_did_and_the_others_still_need_exactly_four():
    # upstream's paper-era E1 took findall(r"\d+")[:4]: a second box after <delim> and a trailing number are
    # scored as box A (IoU 1 under +1); E2/E3 fail both answers, and STRICT the two-box one, as before.
    second_box, trailing = A + "<delim>{<50><50><70><70>}", A + " 7"
    e1 = _evaluate([second_box, trailing], "E1")
    assert (e1.n_failed, e1.hits) == (0, 2) and e1.mean_iou == pytest.approx(1.0)
    for variant in ("E2", "E3"):
        assert _evaluate([second_box, trailing], variant).n_failed == 2
    assert _evaluate([second_box], "STRICT").samples[0].failure == "expected one box, got 2"


def test_e2_counts_failures_as_zero_in_the_mean():
    report = _evaluate([A, B, C], Variant.E2)
    assert report.mean_iou == pytest.approx((1 + 0.5 + 0) / 3)
    assert report.mean_dice == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report.hits == 2  # IoU exactly 0.5 is a hit (>= 0.5)
    assert report.detection_accuracy == pytest.approx(2 / 3) and report.hit_rate == pytest.approx(2 / 3)


def test_e3_excludes_failures_from_the_mean_but_not_from_detection_accuracy():
    report = _evaluate([A, B, C], Variant.E3)
    assert report.mean_iou == pytest.approx((1 + 0.5) / 2)
    assert report.mean_dice == pytest.approx((1 + 2 / 3) / 2)
    assert report.n_scored == 2 and report.hit_rate == pytest.approx(1.0)
    assert report.detection_accuracy == pytest.approx(2 / 3)
    assert report.parse_failure_rate == pytest.approx(1 / 3)


def test_strict_decodes_cell_centres_and_counts_failures_as_zero():
    report = _evaluate([A, B, C, None], Variant.STRICT)
    assert report.mean_iou == pytest.approx((IOU_A_STRICT + IOU_B_STRICT + 0 + 0) / 4)
    assert report.hits == 2  # B: 0.50281 >= 0.5
    assert (report.n_failed, report.n_missing) == (2, 1)
    assert report.samples[0].pred_box == pytest.approx((20.5, 20.5, 60.5, 60.5))
    assert "no box" in report.samples[2].failure and report.samples[3].failure == "missing prediction"


def test_upstream_parser_quirks_differ_from_strict_grammar():
    answers = [
        "{<150><10><160><30>}",  # upstream accepts values up to 999; our grammar refuses
        " x{<10><10><30><30>}",  # upstream's regex is anchored at the start; ours finds the box
        "{<10><10><30><30>}<delim>{<1><2><3><4>}",  # 8 integers: upstream fails; strict wants one box
        "{<10><10><30><30>} 7",  # upstream strips spaces, reads 5 integers and fails; ours ignores the tail
        "{<30><10><10><30>}",  # swapped: upstream scores it (IoU 0); ours refuses it
    ]
    upstream = _evaluate(answers, "E3")
    strict = _evaluate(answers, "STRICT")
    assert [s.failure is None for s in upstream.samples] == [True, False, False, False, True]
    assert [s.failure is None for s in strict.samples] == [False, True, False, True, False]
    assert "outside the grid" in strict.samples[0].failure
    assert "expected one box, got 2" in strict.samples[2].failure
    assert "swapped" in strict.samples[4].failure
    assert upstream.samples[4].iou == 0.0 and upstream.samples[0].iou == 0.0


def test_abd_fixed_scale_factor():
    # Truth (51, 51, 102, 102) on a 256 x 256 slice, answer {<10><10><20><20>}.
    # scale 5.12: (51.2, 51.2, 102.4, 102.4): inter 50.8^2 = 2580.64, union 2621.44 + 2601 - 2580.64 = 2641.8.
    # by size: (25.6, 25.6, 51.2, 51.2): inter 0.2^2 = 0.04, union 655.36 + 2601 - 0.04 = 3256.32.
    args = (["{<10><10><20><20>}"], [(51, 51, 102, 102)], [(256, 256)], "E3")
    assert evaluate_detection(*args, scale=5.12).mean_iou == pytest.approx(2580.64 / 2641.8)
    assert evaluate_detection(*args).mean_iou == pytest.approx(0.04 / 3256.32)
    assert "5.12" in evaluate_detection(*args, scale=5.12).decoding


# ----------------------------------------------------------------------------------- detection, balanced

# 0 TP (truth, answer A), 1 TN (absent, zero box), 2 FP (zero-box truth, a box), 3 FN (truth, zero box),
# 4 failed answer on an empty slice, 5 missing answer where the organ is present.
BALANCED_PREDICTIONS = [A, "{<0><0><0><0>}", "{<5><5><9><9>}", "{<0><0><0><0>}", "no idea", None]
BALANCED_TRUTHS = [TRUTH, None, (0, 0, 0, 0), TRUTH, None, TRUTH]


@pytest.mark.parametrize("variant", ["E2", "E3"])
def test_balanced_upstream_skips_failed_answers(variant):
    report = _evaluate(BALANCED_PREDICTIONS, variant, BALANCED_TRUTHS)
    assert report.balanced
    assert [s.outcome for s in report.samples] == ["TP", "TN", "FP", "FN", None, None]
    # accuracy (1+1)/4; precision 1/(1+1); recall 1/(1+1); F1 0.5. IoU over the one TP: 1.0.
    assert (report.tp, report.tn, report.fp, report.fn) == (1, 1, 1, 1)
    assert (report.accuracy, report.precision, report.recall, report.f1) == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert (report.specificity, report.npv) == pytest.approx((0.5, 0.5))  # TN 1 / (TN 1 + FP 1); 1 / (1 + FN 1)
    assert (report.mean_iou, report.n_scored, report.hits) == (pytest.approx(1.0), 1, 1)
    assert report.detection_accuracy == pytest.approx(1 / 6)  # hits / all samples, as upstream
    assert report.parse_failure_rate == pytest.approx(2 / 6)


def test_balanced_strict_counts_failed_answers_as_wrong():
    report = _evaluate(BALANCED_PREDICTIONS, "STRICT", BALANCED_TRUTHS)
    # failed answer on an empty slice -> FP, missing answer on a present organ -> FN.
    assert [s.outcome for s in report.samples] == ["TP", "TN", "FP", "FN", "FP", "FN"]
    # accuracy 2/6; precision 1/(1+2); recall 1/(1+2); F1 1/3.
    assert (report.accuracy, report.precision, report.recall, report.f1) == pytest.approx((1 / 3,) * 4)
    # specificity TN 1 / (TN 1 + FP 2) = 1/3; NPV TN 1 / (TN 1 + FN 2) = 1/3
    assert (report.specificity, report.npv) == pytest.approx((1 / 3, 1 / 3))
    # IoU over the three slices where the organ is present: TP 0.95152, FN 0, missing 0.
    assert report.n_scored == 3 and report.mean_iou == pytest.approx(IOU_A_STRICT / 3)
    assert report.hit_rate == pytest.approx(1 / 3)


def test_balanced_is_detected_and_e1_refuses_it():
    assert _evaluate([A, "{<0><0><0><0>}"], "E3", [TRUTH, None]).balanced  # balanced=None: an absent truth
    with pytest.raises(MetricsError, match="E1"):
        _evaluate([A, "{<0><0><0><0>}"], "E1", [TRUTH, None])
    with pytest.raises(MetricsError, match="balanced=False"):
        _evaluate([A, "{<0><0><0><0>}"], "E2", [TRUTH, None], balanced=False)


@pytest.mark.parametrize("predictions, truths, sizes, options, words", [
    ([A, B], [TRUTH], [SIZE, SIZE], {}, "one entry per sample"),
    ([], [], [], {}, "nothing to evaluate"),
    ([A], [(60, 20, 20, 60)], [SIZE], {}, "x_min <= x_max"),
    ([A], [(0, 0, 300, 10)], [SIZE], {}, "outside"),
    ([A], [TRUTH], [(0, 200)], {}, "image size"),
    ([A], [TRUTH], [SIZE], {"variant": "E4"}, "bad variant"),
    ([A], [TRUTH], [SIZE], {"scale": 5.12}, "scale"),
])
def test_evaluate_detection_refuses_bad_input(predictions, truths, sizes, options, words):
    with pytest.raises(MetricsError, match=words):
        evaluate_detection(predictions, truths, sizes, **options)


def test_reports_name_their_variant():
    report = _evaluate([A, "{<0><0><0><0>}"], "E3", [TRUTH, None])
    data = report.as_dict()
    assert data["variant"] == "E3" and "HEAD" in data["description"] and "samples" not in data
    assert len(report.as_dict(include_samples=True)["samples"]) == 2
    text = report.format()
    assert text.startswith("[E3]") and "TP 1 TN 1 FP 0 FN 0" in text and "mean IoU 100.00" in text


# --------------------------------------------------------------------------------------------- combining


def test_weighted_combination_over_datasets():
    # (0.595 * 2 + 0.550 * 1) / 3 = 0.58
    assert weighted_mean([0.595, 0.550], [2, 1]) == pytest.approx(0.58)
    first, second = _evaluate([A, B, C], "E2"), _evaluate([A], "E2")
    combined = combine_weighted([first, second])
    # mean IoU (0.5 * 3 + 1.0 * 1) / 4; detection accuracy (2/3 * 3 + 1 * 1) / 4.
    assert combined.metrics["mean_iou"] == pytest.approx(0.625)
    assert combined.metrics["detection_accuracy"] == pytest.approx(0.75)
    assert (combined.variant, combined.n, combined.counts) == ("E2", 4, [3, 1])
    assert combined.format().startswith("[E2]")
    with pytest.raises(MetricsError, match="cannot be combined"):
        combine_weighted([first, _evaluate([A], "E3")])
    with pytest.raises(MetricsError, match="positive count"):
        weighted_mean([0.5], [0])


# ------------------------------------------------------------------------------------------------ yes/no

YES_NO_PREDICTIONS = ["yes", "Yes.", "no", "yes", "maybe", "no"]
YES_NO_TRUTHS = ["yes", "yes", "no", "no", True, "no"]


def test_yes_no_upstream_rule_counts_yes_dot_as_no():
    report = evaluate_yes_no(YES_NO_PREDICTIONS, YES_NO_TRUTHS, rule="upstream")
    # read as yes, no, no, yes, no, no against Y, Y, N, N, Y, N:
    # TP = {0}, FN = {1, 4}, TN = {2, 5}, FP = {3}.
    assert (report.tp, report.fn, report.tn, report.fp) == (1, 2, 2, 1)
    # accuracy 3/6; precision 1/2; recall 1/3; F1 2*1/(2*1 + 1 + 2) = 0.4.
    assert (report.accuracy, report.precision, report.recall, report.f1) == pytest.approx((0.5, 0.5, 1 / 3, 0.4))
    assert report.n_unparsed == 0 and report.as_dict()["rule"] == "upstream"


def test_yes_no_strict_rule_reads_yes_dot_and_counts_unparsed_as_wrong():
    report = evaluate_yes_no(YES_NO_PREDICTIONS, YES_NO_TRUTHS, rule="strict")
    # read as yes, yes, no, yes, ?, no: TP = {0, 1}, TN = {2, 5}, FP = {3}, "maybe" on a yes -> FN.
    assert (report.tp, report.tn, report.fp, report.fn, report.n_unparsed) == (2, 2, 1, 1, 1)
    # accuracy 4/6; precision 2/3; recall 2/3; F1 4/(4 + 1 + 1).
    assert (report.accuracy, report.precision, report.recall, report.f1) == pytest.approx((2 / 3,) * 4)
    assert report.format().startswith("[yes/no, strict]")


def test_yes_no_zero_division_gives_zero():
    # "maybe" on a "no" slice is a false positive under strict: TP 0, FP 1 -> precision 0/1; recall 0/0 -> 0.
    report = evaluate_yes_no(["maybe"], ["no"])
    assert (report.fp, report.accuracy, report.precision, report.recall, report.f1) == (1, 0.0, 0.0, 0.0, 0.0)


def test_yes_no_refuses_bad_input():
    with pytest.raises(MetricsError, match="neither 'yes' nor 'no'"):
        evaluate_yes_no(["yes"], ["perhaps"])
    with pytest.raises(MetricsError, match="one entry per sample"):
        evaluate_yes_no(["yes", "no"], ["yes"])
    with pytest.raises(MetricsError, match="unknown yes/no rule"):
        evaluate_yes_no(["yes"], ["yes"], rule="loose")
