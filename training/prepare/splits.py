"""One seeded train/test (and val) split by volume, shared by every task and every stage of the cascade.

Upstream drew each task's split on its own and unseeded, so a tumour-test volume could train the pancreas
detector of the same cascade (docs/datasets.md, flaw 3). Here each volume gets ONE split, written to
`OUT/splits.json`, and every task set is cut from it: no test volume of one task is a training volume of another.

Rules, in order:
1. Duplicate groups: volumes whose fingerprints match (`fingerprint.py`: exact hash, near duplicate, or at least
   a quarter of the smaller volume's informative slices with the same offset-invariant content), even in
   different datasets, form one group (AbdomenCT-1K re-distributes NIH and MSD scans, possibly cropped by a few
   slices or with another rescale intercept). After the task sets are cut, `prepare` refuses to write them if
   any slice content still appears in both a training (train/val) and a test set (`leaked_slices`).
2. `duplicates="same-split"` (default) keeps every copy and puts a whole group in one split;
   `duplicates="drop"` keeps one copy per group, the first in dataset order nih, msd, abdomenct1k (then by
   name), and lists the others under "dropped" so the task sets leave them out.
3. Datasets are split in the order nih, msd, abdomenct1k. Within a dataset, volumes are sorted by name and
   shuffled with `random.Random(f"{seed}/{dataset}")`; walking that order, a volume goes to test while the
   dataset has fewer than int(test_ratio * N) test volumes (upstream's count), else to train. A volume
   already placed through its group keeps that split (and counts).
4. With val_ratio > 0, walking the dataset's volumes in a second order, shuffled by its own stream
   `random.Random(f"{seed}/{dataset}/val")`, a volume this dataset just put in train moves (with its group)
   to val while the dataset has fewer than int(val_ratio * N) val volumes, at least 1 when it has 3 or more
   train volumes. Val only ever takes from train, so the test split is the one val_ratio 0 gives. Val
   volumes are held-out TRAINING volumes: the cascade picks its epochs on them and never looks at test.
The split is a pure function of (volumes and their fingerprints, seed, test_ratio, val_ratio, duplicates): the
same inputs give the same file, and adding AbdomenCT-1K never moves an NIH or MSD volume. With val_ratio 0
the document has no val keys at all: it is byte for byte what it was before val existed.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from training.prepare.files import DATASETS, UPSTREAM_DATASET
from training.prepare.fingerprint import is_near_duplicate

DUPLICATE_POLICIES = ("same-split", "drop")
SHARED_SLICE_FRACTION = 0.25  # two different patients share no slice; a crop or offset copy shares nearly all
_MATCH_KINDS = ("exact", "near", "slices")
Key = tuple[str, str]  # (dataset, volume)


def duplicate_groups(metas: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """Groups (size >= 2) of volumes that are the same scan, each member {"dataset", "volume", "match"}.

    "match" is how the member was joined, the strongest first: "exact" (same volume hash), "near" (same shape,
    block means within 2 HU) or "slices" (shares SHARED_SLICE_FRACTION of its informative slices' content).
    """
    keys = [(meta["dataset"], meta["volume"]) for meta in metas]
    parent = list(range(len(metas)))
    match = [""] * len(metas)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int, kind: str) -> None:
        parent[root(i)] = root(j)
        for k in (i, j):
            match[k] = min(match[k] or kind, kind, key=_MATCH_KINDS.index)

    by_hash: dict[str, int] = {}
    by_shape: dict[tuple, list[int]] = {}
    for i, meta in enumerate(metas):
        first = by_hash.setdefault(meta["volume_hash"], i)
        if first != i:
            join(i, first, "exact")
            continue
        for j in by_shape.setdefault(tuple(meta["shape"]), []):
            if root(i) != root(j) and is_near_duplicate(metas[j], meta):
                join(i, j, "near")
        by_shape[tuple(meta["shape"])].append(i)
    for i, j in shared_slice_pairs(metas):
        join(i, j, "slices")
    members: dict[int, list[int]] = {}
    for i in range(len(metas)):
        members.setdefault(root(i), []).append(i)
    groups = [[{"dataset": keys[i][0], "volume": keys[i][1], "match": match[i]}
               for i in sorted(indices, key=lambda i: _order(keys[i]))]
              for indices in members.values() if len(indices) >= 2]
    return sorted(groups, key=lambda group: _order((group[0]["dataset"], group[0]["volume"])))


def shared_slice_pairs(metas: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Index pairs (i < j) of volumes sharing at least SHARED_SLICE_FRACTION of the smaller one's informative
    slice signatures: the same scan cropped by some slices, or stored with a value offset."""
    signatures = [{s for s in meta.get("slice_signatures") or [] if s} for meta in metas]
    holders: dict[str, list[int]] = {}
    for i, own in enumerate(signatures):
        for signature in own:
            holders.setdefault(signature, []).append(i)
    shared: dict[tuple[int, int], int] = {}
    for indices in holders.values():
        for a, i in enumerate(indices):
            for j in indices[a + 1:]:
                shared[(i, j)] = shared.get((i, j), 0) + 1
    return sorted(pair for pair, count in shared.items()
                  if count >= SHARED_SLICE_FRACTION * min(len(signatures[pair[0]]), len(signatures[pair[1]])))


def split_names(val_ratio: float) -> tuple[str, ...]:
    """The splits a run produces: train and test, plus val when val_ratio > 0."""
    return ("train", "test", "val") if val_ratio > 0 else ("train", "test")


def make_splits(metas: list[dict[str, Any]], seed: int, test_ratio: float, duplicates: str,
                val_ratio: float = 0.0) -> dict[str, Any]:
    """The split document written to `OUT/splits.json` (see the module doc for the rules)."""
    groups = duplicate_groups(metas)
    group_of = {(m["dataset"], m["volume"]): [(g["dataset"], g["volume"]) for g in group]
                for group in groups for m in group}
    dropped = []
    if duplicates == "drop":
        dropped = [{"dataset": m["dataset"], "volume": m["volume"],
                    "duplicate_of": f"{group[0]['dataset']}/{group[0]['volume']}"} for group in groups for m in group[1:]]
    dropped_keys = {(d["dataset"], d["volume"]) for d in dropped}
    assigned: dict[Key, str] = {}
    splits: dict[str, dict[str, list[str]]] = {}
    for dataset in DATASETS:
        keys = sorted((dataset, m["volume"]) for m in metas
                      if m["dataset"] == dataset and (dataset, m["volume"]) not in dropped_keys)
        if not keys:
            continue
        placed_before = set(assigned)
        _fill(_shuffled(keys, f"{seed}/{dataset}"), "test", int(test_ratio * len(keys)), assigned, group_of,
              lambda key: key not in assigned)
        for key in (k for k in keys if k not in assigned):
            _place(key, "train", assigned, group_of)
        if val_ratio > 0:
            # only volumes placed by this dataset: a group placed by an earlier one must stay whole
            _fill(_shuffled(keys, f"{seed}/{dataset}/val"), "val", _wanted_val(val_ratio, keys, assigned), assigned,
                  group_of, lambda key: key not in placed_before and assigned[key] == "train")
        splits[dataset] = {split: sorted(v for d, v in keys if assigned[(d, v)] == split)
                           for split in split_names(val_ratio)}
    ratios = {"test_ratio": test_ratio, **({"val_ratio": val_ratio} if val_ratio > 0 else {})}
    return {"seed": seed, **ratios, "duplicates": duplicates, "splits": splits,
            "duplicate_groups": groups, "dropped": dropped}


def _shuffled(keys: list[Key], stream: str) -> list[Key]:
    order = list(keys)
    random.Random(stream).shuffle(order)
    return order


def _fill(order: list[Key], split: str, wanted: int, assigned: dict[Key, str], group_of: dict[Key, list[Key]],
          may_take: Callable[[Key], bool]) -> None:
    """Walk `order`, putting each volume `may_take` accepts, with its group, into `split` while fewer than
    `wanted` of the dataset's volumes are there (volumes placed earlier count)."""
    for key in order:
        if sum(assigned.get(k) == split for k in order) >= wanted:
            return
        if may_take(key):
            _place(key, split, assigned, group_of)


def _place(key: Key, split: str, assigned: dict[Key, str], group_of: dict[Key, list[Key]]) -> None:
    for member in group_of.get(key, [key]):
        assigned[member] = split


def _wanted_val(val_ratio: float, keys: list[Key], assigned: dict[Key, str]) -> int:
    """int(val_ratio * N), but at least 1 when the dataset has 3 or more train volumes to take it from."""
    in_train = sum(assigned[key] == "train" for key in keys)
    return max(int(val_ratio * len(keys)), 1 if in_train >= 3 else 0)


def split_of(document: dict[str, Any]) -> dict[tuple[str, str], str]:
    """{(dataset, volume): "train" | "test" | "val"} of a split document; dropped volumes are absent."""
    return {(dataset, volume): split for dataset, by_split in document["splits"].items()
            for split, volumes in by_split.items() for volume in volumes}


def moved_volumes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Volumes present in both documents whose split changed (to warn that a re-run moved them)."""
    before, after = split_of(previous), split_of(current)
    return sorted(f"{d}/{v}" for (d, v), split in after.items() if before.get((d, v), split) != split)


def _order(key: tuple[str, str]) -> tuple[int, str]:
    return DATASETS.index(key[0]), key[1]


def leaked_slices(metas: list[dict[str, Any]], tasks: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    """Slices of a test set whose content (offset-invariant signature) is also in a train or val set of any
    task, as "task/test dataset/volume slice s = dataset/volume slice t"; empty when nothing leaked."""
    signature_of = {(meta["dataset"], meta["volume"]): meta.get("slice_signatures") or [] for meta in metas}
    dataset_of = {upstream: dataset for dataset, upstream in UPSTREAM_DATASET.items()}

    def slices(split_is_test: bool):
        for task, by_split in tasks.items():
            for split, entries in by_split.items():
                if (split == "test") != split_is_test:
                    continue
                for entry in entries:
                    where = (dataset_of[entry["dataset"]], entry["volume"])
                    signatures = signature_of.get(where, [])
                    index = entry["slice_index"]
                    if index < len(signatures) and signatures[index]:
                        yield signatures[index], f"{task}/{split} {where[0]}/{where[1]} slice {index}"

    trained = dict(slices(split_is_test=False))
    return sorted({f"{place} = {trained[signature]}" for signature, place in slices(split_is_test=True)
                   if signature in trained})
