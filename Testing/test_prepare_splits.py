"""The shared split (seeded, disjoint, duplicate-aware) and the task sets cut from it."""

from __future__ import annotations

import hashlib
import random
import zlib

import numpy as np
import pytest

from training.prepare.fingerprint import fingerprint
from training.prepare.records import mask_stats, volume_records
from training.prepare.splits import leaked_slices, make_splits, split_of
from training.prepare.tasks import TaskBuilder


def _meta(dataset: str, volume: str, shape=(40, 64, 64), signature_shift: float = 0.0, seed: int | None = None):
    """Volume metadata as volume_job writes it; the same `seed` means the same scan."""
    rng = np.random.default_rng(seed if seed is not None else zlib.crc32(f"{dataset}/{volume}".encode()))
    signature = (rng.normal(0, 300, 512) + signature_shift).round(2).tolist()
    key = f"{seed}" if seed is not None else f"{dataset}/{volume}"
    return {"dataset": dataset, "volume": volume, "shape": list(shape), "spacing": [0.8, 0.8, 2.5],
            "signature": signature,
            "volume_hash": hashlib.sha256(f"{key}/{signature_shift}".encode()).hexdigest()}


def _metas(counts=(("nih", 20), ("msd", 30), ("abdomenct1k", 25))):
    return [_meta(dataset, f"{dataset}_{n:03d}") for dataset, count in counts for n in range(count)]


def test_split_is_disjoint_complete_and_sized_like_upstream():
    document = make_splits(_metas(), seed=42, test_ratio=0.2, duplicates="same-split")
    for dataset, count in (("nih", 20), ("msd", 30), ("abdomenct1k", 25)):
        train, test = document["splits"][dataset]["train"], document["splits"][dataset]["test"]
        assert not set(train) & set(test)
        assert len(train) + len(test) == count
        assert len(test) == int(0.2 * count)  # upstream's int(0.2 * N)


def test_split_is_stable_for_a_seed_and_changes_with_it():
    metas = _metas()
    first = make_splits(metas, seed=7, test_ratio=0.2, duplicates="same-split")
    shuffled = random.Random(1).sample(metas, len(metas))  # input order does not matter
    assert make_splits(shuffled, seed=7, test_ratio=0.2, duplicates="same-split") == first
    other = make_splits(metas, seed=8, test_ratio=0.2, duplicates="same-split")
    assert other["splits"] != first["splits"]


def test_adding_a_dataset_never_moves_the_others():
    without_abd = make_splits(_metas((("nih", 20), ("msd", 30))), 42, 0.2, "same-split")
    with_abd = make_splits(_metas(), 42, 0.2, "same-split")
    for dataset in ("nih", "msd"):
        assert with_abd["splits"][dataset] == without_abd["splits"][dataset]


def test_a_scan_in_two_datasets_lands_in_one_split_or_is_dropped():
    metas = _metas()
    base = make_splits(metas, 42, 0.2, "same-split")
    test_msd = base["splits"]["msd"]["test"][0]
    train_nih = base["splits"]["nih"]["train"][0]
    exact = _meta("abdomenct1k", "Case_00900_0000", seed=1)
    near = _meta("abdomenct1k", "Case_00901_0000", seed=2, signature_shift=1.5)  # re-encoded: within 2 HU
    different = _meta("abdomenct1k", "Case_00902_0000", seed=3, signature_shift=5.0)
    copies = [{**m, "volume": v} for m, v in ((_meta("msd", "x", seed=1), test_msd), (_meta("nih", "x", seed=2), train_nih),
                                               (_meta("nih", "x", seed=3), "nih_005"))]
    metas = [m for m in metas if (m["dataset"], m["volume"]) not in {("msd", test_msd), ("nih", train_nih),
                                                                     ("nih", "nih_005")}]
    metas += copies + [exact, near, different]
    document = make_splits(metas, 42, 0.2, "same-split")
    split = split_of(document)
    assert split[("abdomenct1k", "Case_00900_0000")] == split[("msd", test_msd)]
    assert split[("abdomenct1k", "Case_00901_0000")] == split[("nih", train_nih)]
    groups = {tuple((m["dataset"], m["volume"], m["match"]) for m in g) for g in document["duplicate_groups"]}
    assert groups == {(("msd", test_msd, "exact"), ("abdomenct1k", "Case_00900_0000", "exact")),
                      (("nih", train_nih, "near"), ("abdomenct1k", "Case_00901_0000", "near"))}
    dropped = make_splits(metas, 42, 0.2, "drop")
    assert {d["volume"] for d in dropped["dropped"]} == {"Case_00900_0000", "Case_00901_0000"}
    assert ("abdomenct1k", "Case_00900_0000") not in split_of(dropped)
    assert dropped["dropped"][0]["duplicate_of"] in (f"msd/{test_msd}", f"nih/{train_nih}")


def _volume(masks: dict[str, np.ndarray], dataset: str = "msd", volume: str = "pancreas_001") -> list[dict]:
    shape = next(iter(masks.values())).shape
    stats = {name: mask_stats(mask) for name, mask in masks.items()}
    extra = [{"volume": volume, "image": f"{dataset}/slices/{volume}_slice_{s}.png"} for s in range(shape[0])]
    return volume_records(dataset, f"{volume}.nii.gz", shape, stats, extra)


def _msd_volume(volume: str) -> list[dict]:
    """Pancreas boxes with area ratios 1.0, 0.604 (-> 0.6), 0.61, 0.3; a tumour on slices 0 and 2; 3 empty slices."""
    pancreas = np.zeros((7, 30, 200), bool)
    pancreas[0, 0:21, 0:51] = True  # box area 50 * 20 = 1000
    pancreas[1, 0:5, 0:152] = True  # 151 * 4 = 604 -> ratio 0.6: NOT selected (strict > on the rounded ratio)
    pancreas[2, 0:11, 0:62] = True  # 61 * 10 = 610 -> 0.61: selected
    pancreas[3, 0:11, 0:31] = True  # 300 -> 0.3
    tumour = np.zeros_like(pancreas)
    tumour[0, 2:8, 2:12] = True
    tumour[2, 2:8, 2:12] = True
    return _volume({"pancreas": pancreas, "tumor": tumour}, volume=volume)


def test_detection_sets_use_the_strict_threshold_on_rounded_ratios_and_balance_with_empty_slices():
    records = _msd_volume("pancreas_001")
    assert [r["pancreas_bbox_ratio"] for r in records[:4]] == [1.0, 0.6, 0.61, 0.3]
    builder = TaskBuilder(threshold=0.6, seed=42)
    builder.add_volume("msd", "pancreas_001", "train", records)
    tasks = builder.finish()
    detection = tasks["pancreas_detection_msd"]["train"]
    assert [e["slice_index"] for e in detection] == [0, 2]
    assert detection[0]["answer"] == "{<0><0><25><66>}"  # int(50/200*100), int(20/30*100)
    assert detection[0]["bbox"] == [0, 0, 50, 20] and detection[0]["phrase"] == "pancreas"
    balanced = tasks["pancreas_detection_balanced_msd"]["train"]
    absent = [e for e in balanced if e["pixels_pancreas"] == 0]
    assert len(absent) == 2 and {e["slice_index"] for e in absent} <= {4, 5, 6}
    assert all(e["answer"] == "{<0><0><0><0>}" and e["bbox"] == [0, 0, 0, 0] for e in absent)
    assert [e["q_id"] for e in balanced] == [1, 2, 3, 4]
    assert tasks["tumor_detection_msd"]["train"][0]["phrase"] == "pancreatic tumor"
    again = TaskBuilder(threshold=0.6, seed=42)
    again.add_volume("msd", "pancreas_001", "train", records)
    assert again.finish() == tasks  # seeded


def test_the_test_split_can_keep_every_slice_with_the_structure_while_training_keeps_the_large_ones():
    builder = TaskBuilder(threshold=0.6, seed=42, test_threshold=0.0)
    builder.add_volume("msd", "pancreas_001", "train", _msd_volume("pancreas_001"))
    builder.add_volume("msd", "pancreas_002", "test", _msd_volume("pancreas_002"))
    tasks = builder.finish()
    assert [e["slice_index"] for e in tasks["pancreas_detection_msd"]["train"]] == [0, 2]
    assert [e["slice_index"] for e in tasks["pancreas_detection_msd"]["test"]] == [0, 1, 2, 3]  # the strict protocol
    assert [e["slice_index"] for e in tasks["tumor_detection_msd"]["test"]] == [0, 2]


def test_tumour_classification_fixed_uses_one_volume_for_both_answers_and_upstream_mixes_hospitals():
    builder = TaskBuilder(threshold=0.6, seed=42)
    for n in (1, 2):
        builder.add_volume("msd", f"pancreas_00{n}", "train", _msd_volume(f"pancreas_00{n}"))
    nih_pancreas = np.zeros((3, 30, 200), bool)
    nih_pancreas[:, 5:15, 10:40] = True
    for n in (1, 2, 3):
        builder.add_volume("nih", f"PANCREAS_000{n}", "train", _volume({"pancreas": nih_pancreas}, "nih",
                                                                       f"PANCREAS_000{n}"))
    tasks = builder.finish()
    fixed = tasks["tumor_classification"]["train"]
    # per volume: positives = tumour ratio > 0.6 (slices 0, 2); negatives = pancreas > 0.6 without tumour: none
    assert fixed == []
    upstream = tasks["tumor_classification_upstream"]["train"]
    answers = {(e["dataset"], e["answer"]) for e in upstream}
    assert answers == {("MSD", "yes"), ("NIH", "no")}  # the hospital predicts the answer: flaw 2, kept on purpose
    assert sum(e["answer"] == "yes" for e in upstream) == sum(e["answer"] == "no" for e in upstream) == 4
    nih = next(e for e in upstream if e["dataset"] == "NIH")
    assert (nih["width"], nih["height"]) == (29, 9)  # x_max - x_min, y_max - y_min: PIL's exclusive crop
    assert nih["image"].startswith("tasks/tumor_classification_upstream_crops/")


def test_tumour_classification_fixed_pairs_each_positive_with_a_negative_at_its_level():
    pancreas = np.zeros((21, 20, 20), bool)
    pancreas[:, 2:12, 2:12] = True
    tumour = np.zeros_like(pancreas)
    tumour[4:6, 4:10, 4:10] = True  # 2 positive slices (levels 0.2, 0.25), 19 tumour-free pancreas slices
    builder = TaskBuilder(threshold=0.6, seed=42)
    builder.add_volume("msd", "pancreas_007", "train", _volume({"pancreas": pancreas, "tumor": tumour},
                                                               volume="pancreas_007"))
    entries = builder.finish()["tumor_classification"]["train"]
    assert [(e["slice_index"], e["answer"]) for e in entries] == [(3, "no"), (4, "yes"), (5, "yes"), (6, "no")]
    assert [e["pancreas_level"] for e in entries] == [0.15, 0.2, 0.25, 0.3]
    assert all(e["image"] == f"msd/slices/pancreas_007_slice_{e['slice_index']}.png" for e in entries)  # full slice


def test_multi_organ_entries_are_balanced_across_organs():
    organs = {name: np.zeros((8, 20, 20), bool) for name in ("liver", "kidney", "spleen", "pancreas")}
    for name, count in (("liver", 8), ("kidney", 5), ("spleen", 6), ("pancreas", 3)):
        organs[name][:count, 2:12, 2:12] = True
    masks = {**organs, "right_kidney": organs["kidney"], "left_kidney": np.zeros((8, 20, 20), bool)}
    records = _volume(masks, "abdomenct1k", "Case_00001_0000")
    for record in records:
        record.update(source_file="x", source_voxel_index={}, spacing=[1, 1, 1], content_hash="", volume_hash="")
    builder = TaskBuilder(threshold=0.6, seed=42)
    builder.add_volume("abdomenct1k", "Case_00001_0000", "train", records)
    entries = builder.finish()["multi_organ_abdomenct1k"]["train"]
    assert sorted(e["organ"] for e in entries) == sorted(["liver", "kidney", "spleen", "pancreas"] * 3)
    unbalanced = TaskBuilder(threshold=0.6, seed=42, organ_balance=False)
    unbalanced.add_volume("abdomenct1k", "Case_00001_0000", "train", records)
    assert len(unbalanced.finish()["multi_organ_abdomenct1k"]["train"]) == 8 + 5 + 6 + 3
    assert entries[0]["answer"] == "{<10><10><55><55>}" and entries[0]["phrase"] == entries[0]["organ"]


@pytest.mark.parametrize("seed", [1, 2])
def test_balanced_sampling_differs_between_seeds_but_not_between_runs(seed):
    pancreas = np.zeros((30, 10, 10), bool)
    pancreas[:3, 2:8, 2:8] = True
    records = _volume({"pancreas": pancreas, "tumor": np.zeros_like(pancreas)})
    picks = []
    for run_seed in (seed, seed, seed + 10):
        builder = TaskBuilder(threshold=0.6, seed=run_seed)
        builder.add_volume("msd", "pancreas_001", "train", records)
        picks.append([e["slice_index"] for e in builder.finish()["pancreas_detection_balanced_msd"]["train"]])
    assert picks[0] == picks[1] and picks[0] != picks[2]


def _metas_with_copies():
    """_metas() plus AbdomenCT-1K copies of the first ten NIH scans and one scan stored twice in AbdomenCT-1K."""
    copies = [{**_meta("nih", f"nih_{n:03d}"), "dataset": "abdomenct1k", "volume": f"Case_{n:05d}_0000"}
              for n in range(10)]
    twice = [{**_meta("abdomenct1k", "abdomenct1k_000"), "volume": "abdomenct1k_100"}]
    return _metas() + copies + twice


def test_val_ratio_zero_is_the_split_without_val():
    metas = _metas_with_copies()
    document = make_splits(metas, 42, 0.2, "same-split", val_ratio=0.0)
    assert document == make_splits(metas, 42, 0.2, "same-split")
    assert "val_ratio" not in document
    assert all(set(by_split) == {"train", "test"} for by_split in document["splits"].values())


def test_val_comes_from_train_leaves_test_alone_and_keeps_groups_whole():
    metas = _metas_with_copies()
    without = make_splits(metas, 42, 0.2, "same-split")
    document = make_splits(metas, 42, 0.2, "same-split", val_ratio=0.25)
    assert document["val_ratio"] == 0.25
    for dataset, by_split in document["splits"].items():
        assert by_split["test"] == without["splits"][dataset]["test"]
        train, val, test = (set(by_split[s]) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test)
        assert train | val == set(without["splits"][dataset]["train"])
    assert [len(document["splits"][d]["val"]) for d in ("nih", "msd")] == [int(0.25 * 20), int(0.25 * 30)]
    split = split_of(document)
    assert "val" in split.values()
    for group in document["duplicate_groups"]:
        assert len({split[(m["dataset"], m["volume"])] for m in group}) == 1
    # a group went to val with its NIH volume, so the AbdomenCT-1K copy is in val although ABD did not choose it
    assert any(split[(g[0]["dataset"], g[0]["volume"])] == "val" for g in document["duplicate_groups"])


def test_small_datasets_get_one_val_volume_from_three_train_volumes():
    document = make_splits(_metas((("nih", 3), ("msd", 2))), 42, 0.2, "same-split", val_ratio=0.1)
    assert len(document["splits"]["nih"]["val"]) == 1  # int(0.1 * 3) = 0, but 3 train volumes can spare one
    assert document["splits"]["msd"]["val"] == []  # 2 train volumes: both stay in train


def test_val_task_sets_follow_the_train_rules_and_the_upstream_set_pairs_val_with_val():
    nih_pancreas = np.zeros((3, 30, 200), bool)
    nih_pancreas[:, 5:15, 10:40] = True
    volumes = [("msd", "pancreas_001", _msd_volume("pancreas_001")),
               ("nih", "PANCREAS_0001", _volume({"pancreas": nih_pancreas}, "nih", "PANCREAS_0001"))]
    as_split = {}
    for split in ("train", "val"):
        builder = TaskBuilder(threshold=0.6, seed=42, splits=("train", "test", "val"))
        for dataset, volume, records in volumes:
            builder.add_volume(dataset, volume, split, records)
        as_split[split] = builder.finish()
    for task, by_split in as_split["val"].items():
        assert set(by_split) == {"train", "test", "val"} and by_split["train"] == by_split["test"] == []
        if task != "tumor_classification_upstream":  # drawn per split: same rule, another draw
            assert by_split["val"] == as_split["train"][task]["train"]
    upstream = as_split["val"]["tumor_classification_upstream"]["val"]
    assert {(e["dataset"], e["answer"]) for e in upstream} == {("MSD", "yes"), ("NIH", "no")}


def _scan(seed: int, slices: int = 40) -> np.ndarray:
    """A model-view HU array [S, 24, 24]: a body of random tissue on air, two padding slices at each end."""
    hu = np.full((slices, 24, 24), -1024, np.int16)
    hu[2:-2, 4:20, 4:20] = np.random.default_rng(seed).integers(-100, 300, (slices - 4, 16, 16))
    return hu


def _fingerprinted(dataset: str, volume: str, hu: np.ndarray) -> dict:
    prints = fingerprint(hu, (0.8, 0.8, 2.5))
    return {"dataset": dataset, "volume": volume, "shape": list(hu.shape), "spacing": [0.8, 0.8, 2.5],
            "volume_hash": prints.volume_hash, "signature": prints.signature,
            "slice_signatures": prints.slice_signatures}


def test_a_copy_cropped_by_a_slice_at_each_end_or_stored_with_an_offset_is_the_same_scan():
    nih = [_fingerprinted("nih", f"PANCREAS_{n:04d}", _scan(n)) for n in range(1, 11)]
    cropped = _fingerprinted("abdomenct1k", "Case_00001_0000", _scan(1)[1:-1])  # 38 of 40 slices, byte-identical
    offset = _fingerprinted("abdomenct1k", "Case_00002_0000", _scan(2) + 1000)  # another rescale intercept
    other = _fingerprinted("abdomenct1k", "Case_00003_0000", _scan(99))  # another patient, same padding slices
    document = make_splits(nih + [cropped, offset, other], 42, 0.2, "same-split")
    groups = {tuple((m["dataset"], m["volume"], m["match"]) for m in g) for g in document["duplicate_groups"]}
    assert groups == {(("nih", "PANCREAS_0001", "slices"), ("abdomenct1k", "Case_00001_0000", "slices")),
                      (("nih", "PANCREAS_0002", "slices"), ("abdomenct1k", "Case_00002_0000", "slices"))}
    split = split_of(document)
    assert split[("abdomenct1k", "Case_00001_0000")] == split[("nih", "PANCREAS_0001")]
    assert split[("abdomenct1k", "Case_00002_0000")] == split[("nih", "PANCREAS_0002")]


def test_a_test_slice_whose_content_is_trained_on_is_reported():
    shared = _scan(5)
    mixed = _scan(6)
    mixed[10:12] = shared[10:12]  # 2 of 36 informative slices: too few to call it the same scan
    metas = [_fingerprinted("msd", "pancreas_001", shared), _fingerprinted("msd", "pancreas_002", mixed)]
    assert make_splits(metas, 42, 0.5, "same-split")["duplicate_groups"] == []
    pancreas = np.zeros((40, 24, 24), bool)
    pancreas[2:-2, 6:18, 6:18] = True
    builder = TaskBuilder(threshold=0.6, seed=42)
    for (volume, split) in (("pancreas_001", "test"), ("pancreas_002", "train")):
        builder.add_volume("msd", volume, split, _volume({"pancreas": pancreas, "tumor": np.zeros_like(pancreas)},
                                                         volume=volume))
    leaks = leaked_slices(metas, builder.finish())
    assert "pancreas_detection_msd/test msd/pancreas_001 slice 10 = pancreas_detection_msd/train msd/pancreas_002 " \
           "slice 10" in leaks
    assert {leak.split(" = ")[0].rsplit(" ", 1)[1] for leak in leaks} == {"10", "11"}


def _tumour_volume(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A pancreas over slices 2-27 that is widest mid-way, with a tumour on 6 slices low in it that enlarges the
    pancreas there (the tumour is part of the pancreas label): tumour slices have the larger pancreas boxes."""
    pancreas = np.zeros((30, 64, 64), bool)
    tumour = np.zeros_like(pancreas)
    start, growth = int(rng.integers(3, 14)), int(rng.integers(0, 10))
    for s in range(2, 28):
        side = 20 + int(12 * np.sin(np.pi * (s - 2) / 26)) + int(rng.integers(0, 4))
        if start <= s < start + 6:
            side += growth
            tumour[s, 2:10, 2:10] = True
        pancreas[s, :side, :side] = True
    return {"pancreas": pancreas, "tumor": tumour}


def test_tumour_yes_no_classes_are_matched_so_pancreas_size_and_level_do_not_answer_it():
    from training.evaluate_scoring import roc_auc
    from training.prepare.matching import shortcut_aucs

    rng = np.random.default_rng(5)
    volumes = [(f"pancreas_{n:03d}", "test" if n >= 12 else "train", _tumour_volume(rng)) for n in range(15)]
    builders = [TaskBuilder(threshold=0.2, seed=42) for _ in range(2)]
    for builder in builders:
        for volume, split, masks in volumes:
            builder.add_volume("msd", volume, split, _volume(masks, volume=volume))
    by_split = builders[0].finish()["tumor_classification"]
    assert builders[1].finish()["tumor_classification"] == by_split  # seeded
    assert builders[0].tc_tolerances["train"] == (0.05, 0.1)  # (box ratio, level): enough pairs, not widened
    train = by_split["train"]
    yes = np.array([e["answer"] == "yes" for e in train])
    # one rule with per-volume nearest-ratio matching kept 144 entries with box ratio AUC 0.89, slice AUC 0.16;
    # absolute box area is reported but not matched: tumour growth raises a volume's largest box (AUC 0.70 here)
    assert 40 <= len(train) and yes.sum() == len(train) / 2
    aucs = shortcut_aucs(train)  # what summary.json reports
    assert aucs["pancreas_box_ratio"] == round(roc_auc(yes, np.array([e["pancreas_bbox_ratio"] for e in train])), 3)
    assert aucs["pancreas_box_ratio"] < 0.65 and 0.35 < aucs["pancreas_level"] < 0.65
    # pairs are drawn within a split: a test entry comes from a test volume only
    assert {e["volume"] for e in by_split["test"]} <= {"pancreas_012", "pancreas_013", "pancreas_014"}
    assert {e["volume"] for e in train}.isdisjoint({"pancreas_012", "pancreas_013", "pancreas_014"})



def test_a_split_without_a_matched_pair_widens_the_tolerances_rather_than_leave_its_yes_no_set_empty():
    pancreas = np.zeros((3, 40, 40), bool)
    pancreas[0, :20, :20] = pancreas[1, :28, :28] = True
    pancreas[2, :40, :40] = True
    tumour = np.zeros_like(pancreas)
    tumour[2, 30:36, 30:36] = True  # the one tumour slice is the largest: box ratios 1.0 (yes), 0.24 and 0.48 (no)
    builder = TaskBuilder(threshold=0.0, seed=42, splits=("train", "test", "val"))
    builder.add_volume("msd", "pancreas_001", "val", _volume({"pancreas": pancreas, "tumor": tumour}))
    entries = builder.finish()["tumor_classification"]["val"]
    assert [(e["slice_index"], e["answer"]) for e in entries] == [(1, "no"), (2, "yes")]
    assert builder.tc_tolerances["val"] == (0.8, 1.6)  # 16 x (0.05, 0.1): the smallest doubling with a pair
