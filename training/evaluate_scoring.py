"""Scoring of saved evaluation answers under every protocol: E1 / E2 / E3 (upstream's) and STRICT (ours).

Detection tasks are scored with `SlicerMiniGPTPancreas.metrics.evaluate_detection` once per variant:

* `*_balanced_*` tasks use the balanced rules (TP/TN/FP/FN on present/absent, IoU over TP for E2/E3); E1 had no
  balanced rule and is reported as skipped.
* The truth is each entry's `bbox`: for tumour detection that is the tumour box. Upstream HEAD scores tumour
  answers against the pancreas box (docs/upstream.md 6.2); that bug is not reproduced.
* AbdomenCT-1K (entries with an `organ`) is scored per organ and combined sample-weighted over organs, as
  upstream's `evaluate_datasets_ABD`; there E3 decodes with upstream's fixed factor 5.12 (512-px images).
* Tasks that differ only in their dataset suffix (`pancreas_detection_nih` + `_msd`) are also combined
  sample-weighted (sum metric * n / sum n), upstream's "weighted" NIH+MSD number.

Yes/no tasks get the upstream rule (anything but exactly "yes" is "no") and the strict rule
(`metrics.evaluate_yes_no`) with balanced accuracy, specificity and NPV added, plus the ROC AUC of the yes
probability (computed here, in numpy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from SlicerMiniGPTPancreas.metrics import (
    DetectionReport, MetricsError, SampleScore, Variant, combine_weighted, evaluate_detection, evaluate_yes_no,
)
from training.evaluate_tasks import EvaluateError, TaskSet
from training.evaluate_confidence import confidence_vs_iou, mid_ranks

VARIANTS = (Variant.E1, Variant.E2, Variant.E3, Variant.STRICT)
VARIANT_NAMES = tuple(variant.value for variant in VARIANTS)
ABD_SCALE = 5.12  # upstream's evaluate_datasets_ABD multiplies grid values by this whatever the image size
ABD_SCALED_VARIANTS = (Variant.E3,)
YES_NO_RULES = ("upstream", "strict")
DATASET_SUFFIXES = ("nih", "msd", "abdomenct1k")
E1_BALANCED = "E1 (paper era) had no rule for balanced sets"

NOTES = {
    "tumor": "Tumour detection is scored against the tumour box (each entry's bbox = bbox_tumor). Upstream HEAD "
             "scores tumour answers against the pancreas box (docs/upstream.md 6.2); that bug is not reproduced.",
    "balanced": "Balanced sets (with empty slices): E2/E3/STRICT classify each slice TP/TN/FP/FN; E2/E3 average "
                "IoU over TP only and skip unreadable answers, STRICT averages over every slice with the structure "
                "and counts unreadable answers as misses. E1 had no balanced rule and is not reported.",
    "abd": f"AbdomenCT-1K: per organ, then sample-weighted over organs; E3 decodes with upstream's fixed factor "
           f"{ABD_SCALE} (512-px images), E1/E2 with each image's width/height, STRICT with grid-cell centres.",
    "combined": "'weighted' rows combine datasets as sum(metric * n) / sum(n) (upstream's NIH+MSD number).",
    "tc_upstream": "tumor_classification_upstream reproduces the paper's TC set: MSD tumour slices vs NIH healthy "
                   "slices, cropped to the true pancreas box. It confounds hospital with label and uses an oracle "
                   "crop (docs/datasets.md, flaw 2); prefer tumor_classification.",
    "variants": "E1 = paper era (+1 IoU, hit IoU > 0.5, failures count 0); E2 = continuous IoU, mean over all; "
                "E3 = upstream HEAD, mean over readable answers only; STRICT = ours (cell-centre decoding, pixel "
                "extents, failures count 0). E1-E3 floor grid values as upstream did.",
}


def score_all(tasks: list[TaskSet], predictions: dict[str, dict[int, dict[str, Any]]]
              ) -> tuple[dict[str, Any], dict[str, dict[str, list[float]]]]:
    """({"tasks", "combined", "notes"} for metrics.json, {task: {variant: per-sample IoUs}} for the plots)."""
    results: dict[str, Any] = {}
    reports: dict[str, dict[str, DetectionReport]] = {}
    ious: dict[str, dict[str, list[float]]] = {}
    for task in tasks:
        answers = [predictions[task.name].get(entry["q_id"]) for entry in task.entries]
        try:
            if task.kind == "yes_no":
                results[task.name] = score_yes_no(task, answers)
            else:
                results[task.name], reports[task.name], ious[task.name] = score_detection(task, answers)
        except MetricsError as error:
            raise EvaluateError(f"cannot score {task.name}: {error}") from error
    combined = combine_datasets(reports, results)
    return {"tasks": results, "combined": combined, "notes": _notes(tasks, results, combined)}, ious


def _dataset(task: TaskSet) -> str:
    return "+".join(sorted({str(entry.get("dataset", "?")) for entry in task.entries}))


def _answer_texts(answers: list[dict[str, Any] | None]) -> list[str | None]:
    return [None if record is None else record.get("answer") for record in answers]


# ------------------------------------------------------------------------------------------------ detection

def balanced_task(task: TaskSet) -> bool:
    """Whether a detection task holds empty slices (answered `{<0><0><0><0>}`) and is scored as balanced."""
    return "_balanced" in task.name


def score_detection(task: TaskSet, answers: list[dict[str, Any] | None]
                    ) -> tuple[dict[str, Any], dict[str, DetectionReport], dict[str, list[float]]]:
    """(metrics.json entry, per-variant reports for combining datasets (none for per-organ tasks, which are
    combined over organs instead), per-variant IoUs of the scored samples)."""
    balanced = balanced_task(task)
    texts = _answer_texts(answers)
    result: dict[str, Any] = {"kind": "detection", "dataset": _dataset(task), "n": len(task.entries),
                              "n_predicted": sum(text is not None for text in texts), "balanced": balanced,
                              "variants": {}}
    organs = sorted({entry["organ"] for entry in task.entries if "organ" in entry})
    groups = {organ: [i for i, e in enumerate(task.entries) if e.get("organ") == organ] for organ in organs} \
        or {None: list(range(len(task.entries)))}
    if organs:
        result["organs"] = {organ: {"n": len(indices), "variants": {}} for organ, indices in groups.items()}
    reports: dict[str, DetectionReport] = {}
    ious: dict[str, list[float]] = {}
    for variant in VARIANTS:
        if balanced and variant is Variant.E1:
            result["variants"][variant.value] = {"skipped": E1_BALANCED}
            continue
        scale = ABD_SCALE if organs and variant in ABD_SCALED_VARIANTS else None
        group_reports = [evaluate_detection([texts[i] for i in indices], [task.entries[i]["bbox"] for i in indices],
                                            [(task.entries[i]["width"], task.entries[i]["height"]) for i in indices],
                                            variant, balanced=balanced, scale=scale)
                         for indices in groups.values()]
        ious[variant.value] = [s.iou for report in group_reports for s in report.samples if s.iou is not None]
        if organs:  # combined over organs; such tasks are not combined with other datasets
            for organ, report in zip(groups, group_reports):
                result["organs"][organ]["variants"][variant.value] = report.as_dict()
            combined = combine_weighted(group_reports)
            result["variants"][variant.value] = {"weighted_over": "organs", "n": combined.n,
                                                 "counts": dict(zip(groups, combined.counts)), **combined.metrics}
        else:
            result["variants"][variant.value] = group_reports[0].as_dict()
            reports[variant.value] = group_reports[0]
    result["confidence"] = confidence_vs_iou(strict_samples(task, answers), answers)
    return result, reports, ious


def strict_samples(task: TaskSet, answers: list[dict[str, Any] | None]) -> list[SampleScore]:
    """How STRICT reads each answer of a detection task (decoded box, IoU), in the order of the entries."""
    return evaluate_detection(_answer_texts(answers), [entry["bbox"] for entry in task.entries],
                              [(entry["width"], entry["height"]) for entry in task.entries], Variant.STRICT,
                              balanced=balanced_task(task)).samples


def combine_datasets(reports: dict[str, dict[str, DetectionReport]], results: dict[str, Any]) -> dict[str, Any]:
    """Sample-weighted combination of tasks that differ only in their dataset suffix (e.g. NIH + MSD)."""
    groups: dict[str, list[str]] = {}
    for task, by_variant in reports.items():
        base, _, suffix = task.rpartition("_")
        if by_variant and suffix in DATASET_SUFFIXES:
            groups.setdefault(base, []).append(task)
    combined: dict[str, Any] = {}
    for base, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        entry: dict[str, Any] = {"tasks": members, "dataset": "+".join(results[m]["dataset"] for m in members),
                                 "n": sum(results[m]["n"] for m in members), "variants": {}}
        for variant in VARIANTS:
            if any(variant.value not in reports[m] for m in members):
                entry["variants"][variant.value] = dict(results[members[0]]["variants"][variant.value])
                continue
            report = combine_weighted([reports[m][variant.value] for m in members])
            entry["variants"][variant.value] = {"n": report.n, "counts": dict(zip(members, report.counts)),
                                                **report.metrics}
        combined[f"{base}_weighted"] = entry
    return combined


# --------------------------------------------------------------------------------------------------- yes/no

def score_yes_no(task: TaskSet, answers: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Both yes/no rules and the ROC AUC of the yes probability (over entries that have one)."""
    texts = _answer_texts(answers)
    truths = [entry["answer"] for entry in task.entries]
    result: dict[str, Any] = {"kind": "yes_no", "dataset": _dataset(task), "n": len(truths),
                              "n_predicted": sum(text is not None for text in texts),
                              "rules": {rule: _with_rates(evaluate_yes_no(texts, truths, rule).as_dict())
                                        for rule in YES_NO_RULES}}
    pairs = [(str(truth).strip().lower() == "yes", record.get("yes_probability"))
             for truth, record in zip(truths, answers) if record is not None]
    scored = [(label, float(p)) for label, p in pairs if p is not None]
    labels = np.array([label for label, _ in scored], dtype=bool)
    probabilities = np.array([p for _, p in scored], dtype=np.float64)
    auc = roc_auc(labels, probabilities)
    result["auc"] = {"value": auc, "n": len(scored)}
    if auc is None:
        result["auc"]["reason"] = "needs yes probabilities of both a 'yes' and a 'no' entry"
    return result


def _with_rates(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, **yes_no_rates(report["tp"], report["tn"], report["fp"], report["fn"])}


def yes_no_rates(tp: int, tn: int, fp: int, fn: int) -> dict[str, float]:
    """Balanced accuracy, specificity and NPV of yes/no counts (positive = yes; a ratio with no denominator is 0,
    as precision is). Balanced accuracy averages the recall of the classes present in the truth, as sklearn's
    does, so a test set of one class still gets a number."""
    recalls = [hits / total for hits, total in ((tp, tp + fn), (tn, tn + fp)) if total]
    return {"balanced_accuracy": sum(recalls) / len(recalls) if recalls else 0.0,
            "specificity": tn / (tn + fp) if tn + fp else 0.0, "npv": tn / (tn + fn) if tn + fn else 0.0}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties counting
    one half (the Mann-Whitney U statistic over mid-ranks). None when one class is missing.
    labels: bool [N]; scores: float [N]."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    ranks = mid_ranks(scores)  # [N], 1-based
    u_statistic = ranks[labels].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))


def _notes(tasks: list[TaskSet], results: dict[str, Any], combined: dict[str, Any]) -> list[str]:
    names = [task.name for task in tasks]
    wanted = [("variants", any(task.kind == "detection" for task in tasks)),
              ("tumor", any(name.startswith("tumor_detection") for name in names)),
              ("balanced", any("_balanced" in name for name in names)),
              ("abd", any(name.startswith("multi_organ") for name in names)),
              ("combined", bool(combined)), ("tc_upstream", "tumor_classification_upstream" in names)]
    notes = [NOTES[key] for key, present in wanted if present]
    for name, result in results.items():
        missing = result["n"] - result["n_predicted"]
        if missing:
            notes.append(f"{name}: {missing} of {result['n']} test entries have no saved answer yet; they count as "
                         "failed answers. Run evaluate again with the model to answer them.")
    return notes
