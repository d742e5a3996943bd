"""The tumour yes/no set's classes matched on pancreas size and level, so that neither answers the question.

Tumour voxels are part of the pancreas label, so slices with a tumour have larger pancreas boxes, and tumours
sit at some levels of the pancreas more than at others. Selecting both classes by one pancreas rule, even with
per-volume matching by box ratio, left pancreas box ratio alone separating the answers with ROC AUC 0.75-0.81
on the demo phantoms. Here every slice of the smaller class is paired with the unused slice of the other class,
from any volume of the same split (never another split), nearest in pancreas box ratio and level (Euclidean,
each in units of its tolerance), within the tolerance on each; a slice without a partner is left out. The
slices with the fewest partners are paired first (ties in a seeded order), so that greedy pairing keeps most
pairs. Wider tolerances keep more pairs but let the pairs lean one way (at 0.1 and 0.2 the demo's test split
kept box ratio AUC 0.62-0.65). A split with no pair at all (a handful of coarse volumes, as in a miniature
cascade) gets the smallest doubling of the tolerances that finds one, so that its task file is not empty;
the tolerances used are reported with the AUCs.

`shortcut_aucs` measures what is left: the ROC AUC of pancreas box ratio, box area and level alone as a
predictor of "yes" (0.5: no shortcut), written to summary.json for every split.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

# pancreas box ratio (box area / the volume's largest pancreas box area) and level (position within the
# volume's pancreas extent: 0 its lowest slice, 1 its highest)
TOLERANCES = (0.05, 0.1)
_WIDENINGS = (1, 2, 4, 8, 16, 32)  # at 32 every difference (at most 1) is within tolerance


def with_pancreas_level(records: list[dict[str, Any]], chosen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`chosen` (records of one volume) with `pancreas_level`: the slice's position between the lowest and the
    highest slice of `records` that show pancreas (0 and 1)."""
    shown = [r["slice_index"] for r in records if r["pixels_pancreas"] > 0]
    low, high = (min(shown), max(shown)) if shown else (0, 0)
    return [{**r, "pancreas_level": round((r["slice_index"] - low) / max(high - low, 1), 4)} for r in chosen]


def match_classes(positives: list[dict[str, Any]], negatives: list[dict[str, Any]],
                  rng: random.Random) -> tuple[list[dict[str, Any]], tuple[float, float]]:
    """The pairs of positives and negatives (records with `pancreas_level`) within tolerance, sorted by volume
    and slice, and the (ratio, level) tolerances that found them."""
    fewer, more = sorted((positives, negatives), key=len)
    if not fewer:
        return [], TOLERANCES
    targets, pool = _features(fewer), _features(more)  # [F, 2], [M, 2]
    seeded = rng.sample(range(len(fewer)), len(fewer))
    for widening in _WIDENINGS:
        tolerances = np.array(TOLERANCES) * widening
        pairs = _greedy_pairs(targets, pool, seeded, tolerances)
        if pairs:
            break
    kept = [record for i, j in pairs for record in (fewer[i], more[j])]
    return sorted(kept, key=lambda r: (r["volume"], r["slice_index"])), (float(tolerances[0]), float(tolerances[1]))


def _greedy_pairs(targets: np.ndarray, pool: np.ndarray, seeded: list[int],
                  tolerances: np.ndarray) -> list[tuple[int, int]]:
    """(target, pool) index pairs: each target, those with the fewest candidates first, takes the nearest unused
    pool member within tolerance."""
    distances = [_distances(target, pool, tolerances) for target in targets]  # F x [M], inf beyond a tolerance
    order = sorted(seeded, key=lambda i: int(np.isfinite(distances[i]).sum()))
    used = np.zeros(len(pool), bool)
    pairs = []
    for i in order:
        distance = np.where(used, np.inf, distances[i])
        j = int(np.argmin(distance))
        if np.isfinite(distance[j]):
            used[j] = True
            pairs.append((i, j))
    return pairs


def shortcut_aucs(entries: list[dict[str, Any]]) -> dict[str, float | None]:
    """ROC AUC of each pancreas measure alone as a score for "yes" (None when a class is missing)."""
    from training.evaluate_scoring import roc_auc

    labels = [e["answer"] == "yes" for e in entries]
    measures = {"pancreas_box_ratio": [e["pancreas_bbox_ratio"] for e in entries],
                "pancreas_box_area": [_box_area(e["bbox_pancreas"]) for e in entries],
                "pancreas_level": [e["pancreas_level"] for e in entries]}
    aucs = {name: roc_auc(np.array(labels, bool), np.array(values, float)) for name, values in measures.items()}
    return {name: None if auc is None else round(auc, 3) for name, auc in aucs.items()}


def _distances(target: np.ndarray, pool: np.ndarray, tolerances: np.ndarray) -> np.ndarray:
    scaled = np.abs(pool - target) / tolerances  # [M, 2]
    return np.where(scaled.max(axis=1) <= 1, np.sqrt((scaled ** 2).sum(axis=1)), np.inf)


def _features(records: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[r["pancreas_bbox_ratio"], r["pancreas_level"]] for r in records], float).reshape(-1, 2)


def _box_area(box: list[int]) -> int:
    x_min, y_min, x_max, y_max = box
    return (x_max - x_min) * (y_max - y_min)  # no +1, as the records' box ratios
