"""Does a higher box confidence mean a better box? Box confidence against STRICT IoU, per detection task.

The engine gives each box a confidence (`backend.answers`: geometric mean of its number tokens' probabilities);
evaluate saves the first box's as `box_confidence`. Over the answers that drew a box where the structure is,
this reports Spearman's rank correlation between confidence and STRICT IoU and a reliability table: answers
binned by confidence, with each bin's mean IoU and hit rate (IoU >= 0.5). A useful confidence has a clearly
positive correlation and mean IoU rising from bin to bin. Answers saved before `box_confidence` existed have
none and are left out (`n_without_confidence`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONFIDENCE_BINS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)  # bin i holds edges[i] < c <= edges[i + 1] (0 in the first)


def confidence_vs_iou(samples: list, answers: list[dict[str, Any] | None]) -> dict[str, Any]:
    """{"n", "n_without_confidence", "spearman", "bins": [{"range", "n", "mean_confidence", "mean_iou",
    "hit_rate"}]} from the STRICT samples of a detection task and its saved answers (same order)."""
    pairs, without = [], 0
    for sample, record in zip(samples, answers):
        if sample.pred_box is None or sample.truth_absent or sample.iou is None:
            continue  # no box drawn, or nothing to overlap
        confidence = None if record is None else record.get("box_confidence")
        if confidence is None:
            without += 1
        else:
            pairs.append((float(confidence), float(sample.iou)))
    confidences = np.array([c for c, _ in pairs], dtype=np.float64)  # [N]
    ious = np.array([iou for _, iou in pairs], dtype=np.float64)  # [N]
    bins = []
    for low, high in zip(CONFIDENCE_BINS[:-1], CONFIDENCE_BINS[1:]):
        inside = (confidences > low) & (confidences <= high) if low > 0 else confidences <= high
        if inside.any():
            bins.append({"range": [low, high], "n": int(inside.sum()),
                         "mean_confidence": float(confidences[inside].mean()), "mean_iou": float(ious[inside].mean()),
                         "hit_rate": float((ious[inside] >= 0.5).mean())})
    return {"n": len(pairs), "n_without_confidence": without, "spearman": spearman(confidences, ious), "bins": bins}


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rho (Pearson correlation of mid-ranks); None with fewer than 3 pairs or a constant side."""
    if x.size < 3:
        return None
    rx, ry = mid_ranks(x), mid_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else None


def mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks [N] of `values` [N], equal values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def confidence_table(metrics: dict[str, Any]) -> list[str]:
    """The markdown section of tables.md: one row per (detection task, confidence bin)."""
    tasks = [(name, result["confidence"]) for name, result in metrics["tasks"].items() if result.get("confidence")]
    if not tasks:
        return []
    lines = ["### Box confidence against IoU (STRICT)", "",
             "| task | Spearman rho (n) | confidence | n | mean confidence | mean IoU | hit rate |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, result in tasks:
        rho = "n/a" if result["spearman"] is None else f"{result['spearman']:.3f}"
        head = f"| {name} | {rho} ({result['n']}) |"
        if not result["bins"]:
            lines.append(head + " no box with a saved confidence | | | | |")
        for bin_ in result["bins"]:
            low, high = bin_["range"]
            lines.append(f"{head} {low:g}-{high:g} | {bin_['n']} | {bin_['mean_confidence']:.3f} | "
                         f"{bin_['mean_iou']:.3f} | {bin_['hit_rate']:.3f} |")
    return lines + ["", "Over answers that drew a box where the structure is. A useful confidence has a clearly "
                    "positive rho and mean IoU rising with confidence.", ""]
