"""`minigpt-pancreas-train prepare` end to end on phantom NIH, MSD and AbdomenCT-1K folders."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest

from SlicerMiniGPTPancreas.phantom import make_phantom
from SlicerMiniGPTPancreas.phantom_writers import write_abdomenct1k, write_msd, write_nih
from training.cli import main
from broken_files import write_apple_doubles, write_corrupt_file

SMALL = {"size_mm": (150.0, 120.0, 80.0), "spacing": (3.0, 4.0, 5.0)}
MSD_ORIENTATIONS = ("LPS", "RAS", "LAS", "RPI", "ASL", "LSP")


def _phantom(seed: int, orientation: str = "LPS"):
    return make_phantom(seed, orientation=orientation, **SMALL)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Three dataset roots with the quirks of the real ones, and a config naming them."""
    base = tmp_path_factory.mktemp("data")
    msd = [_phantom(20 + n, code) for n, code in enumerate(MSD_ORIENTATIONS)]
    task = write_msd(base / "msd", msd)
    write_apple_doubles(task)
    write_corrupt_file(task / "imagesTr" / "pancreas_099.nii.gz")  # its label is fine, the image is not
    shutil.copy(task / "labelsTr" / "pancreas_001.nii.gz", task / "labelsTr" / "pancreas_099.nii.gz")
    # NIH case 1 is MSD volume 1 re-stored as DICOM (an exact duplicate across datasets)
    write_nih(base / "nih" / "Pancreas-CT", [msd[0], _phantom(31), _phantom(32)], shuffle_names=True)
    # AbdomenCT-1K case 3 is MSD volume 2 again: the leakage docs/datasets.md warns about
    write_abdomenct1k(base / "abd", [_phantom(41), _phantom(42, "RAS"), msd[1]], nested=True, masks_folder="Masks")
    config = base / "prepare.json"
    config.write_text(json.dumps({"roots": {"nih": "nih", "msd": "msd", "abdomenct1k": "abd"}, "seed": 42}))
    return base, config


@pytest.fixture(scope="module")
def prepared(datasets, tmp_path_factory):
    base, config = datasets
    before = _snapshot(base)
    out = tmp_path_factory.mktemp("prepared") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["prepare", "--all", "--config", str(config), "--out", str(out), "--workers", "2", "--quiet"])
    return out, code, before, printed.getvalue()


def _read(path: Path):
    return json.loads(path.read_text())


def test_run_succeeds_and_reports_the_corrupt_file_by_name(prepared):
    out, code, _, printed = prepared
    assert code == 0
    assert "worker processes stopped" not in printed  # the two worker processes did the work
    assert "Slices per split" in printed and "msd/pancreas_099: cannot read" in printed
    problems = _read(out / "problems.json")
    assert [(p["dataset"], p["volume"]) for p in problems] == [("msd", "pancreas_099")]
    assert "pancreas_099.nii.gz" in problems[0]["message"] and "corrupt" in problems[0]["message"]
    prepared_volumes = {p.stem for p in (out / "msd" / "records").glob("*.json")}
    assert prepared_volumes == {f"pancreas_{n:03d}" for n in range(1, 7)}  # `._*` files ignored, 099 skipped
    assert len(list((out / "nih" / "records").glob("*.json"))) == 3
    assert len(list((out / "abdomenct1k" / "records").glob("*.json"))) == 3
    summary = _read(out / "summary.json")
    assert summary["run"] == {"prepared": 12, "resumed": 0, "failed": 1}
    assert {(r["dataset"], r["structure"]) for r in summary["table"]} >= {("msd", "tumor"), ("abdomenct1k", "liver")}
    shortcuts = summary["shortcuts"]["tumor_classification"]  # pancreas measures alone as yes/no scores
    assert set(shortcuts) == {"train", "test"}
    assert all(set(report["auc"]) == {"pancreas_box_ratio", "pancreas_box_area", "pancreas_level"}
               for report in shortcuts.values())
    assert "tumor_classification train: shortcut ROC AUC pancreas_box_ratio" in printed


def test_the_input_folders_are_left_untouched(prepared, datasets):
    before = prepared[2]
    assert _snapshot(datasets[0]) == before


def test_every_png_named_in_the_records_exists_and_is_the_model_view_slice(prepared):
    out = prepared[0]
    records = _read(out / "nih" / "records" / "PANCREAS_0001.json")
    assert [r["slice_index"] for r in records] == list(range(len(records)))
    assert all((out / r["image"]).is_file() for r in records)
    assert records[0]["image"] == "nih/slices/PANCREAS_0001_slice_0.png"
    assert records[0]["source_slice_file"].endswith(".dcm") and records[0]["volume_name"] == "label0001.nii.gz"
    # the DICOM copy of MSD volume 1 gives the same boxes, hashes and pixels as its NIfTI original
    msd = _read(out / "msd" / "records" / "pancreas_001.json")
    assert [r["bbox_pancreas"] for r in records] == [r["bbox_pancreas"] for r in msd]
    assert records[7]["content_hash"] == msd[7]["content_hash"]
    assert (out / records[7]["image"]).read_bytes() == (out / msd[7]["image"]).read_bytes()
    # slice_id: upstream's 1-based counter over a dataset's slices in volume order
    second = _read(out / "nih" / "records" / "PANCREAS_0002.json")
    assert second[0]["slice_id"] == len(records) + 1 and records[0]["slice_id"] == 1


def test_each_dataset_gets_upstreams_slices_info_file_with_every_record(prepared):
    out = prepared[0]
    for dataset, prefix in (("nih", "NIH"), ("msd", "MSD"), ("abdomenct1k", "ABD")):
        records = [r for f in sorted((out / dataset / "records").glob("*.json")) for r in _read(f)]
        slices_info = _read(out / dataset / f"{prefix}_slices_info.json")
        assert sorted(slices_info, key=lambda r: r["slice_id"]) == sorted(records, key=lambda r: r["slice_id"])
        assert [r["slice_id"] for r in sorted(slices_info, key=lambda r: r["slice_id"])] == list(
            range(1, len(records) + 1))
        # a later reader (training, evaluation) finds the source wherever it runs from
        assert all(Path(r["source_file"]).is_absolute() and Path(r["source_file"]).exists() for r in records)


def test_splits_are_shared_disjoint_and_keep_duplicates_together(prepared):
    out = prepared[0]
    document = _read(out / "splits.json")
    assert document["seed"] == 42 and document["test_ratio"] == 0.2
    split = {(d, v): s for d, by in document["splits"].items() for s, vs in by.items() for v in vs}
    groups = [{(m["dataset"], m["volume"]) for m in g} for g in document["duplicate_groups"]]
    assert {("nih", "PANCREAS_0001"), ("msd", "pancreas_001")} in groups
    assert {("msd", "pancreas_002"), ("abdomenct1k", "Case_00003_0000")} in groups
    for group in groups:
        assert len({split[member] for member in group}) == 1
    # no volume (or a copy of it) that is tested anywhere is trained on anywhere
    scans = {member: frozenset(g) for g in groups for member in g}
    train, test = set(), set()
    for path in (out / "tasks").glob("*.json"):
        volumes = {scan for e in _read(path) for scan in scans.get((_dataset(e), e["volume"]), {(_dataset(e),
                                                                                                e["volume"])})}
        (train if path.stem.endswith("_train") else test).update(volumes)
    assert test and not (train & test)
    tumour_test = {e["volume"] for e in _read(out / "tasks" / "tumor_detection_msd_test.json")}
    assert tumour_test == set(document["splits"]["msd"]["test"])  # MSD's one test volume, for every MSD task


def _dataset(entry: dict) -> str:
    return {"NIH": "nih", "MSD": "msd", "ABD": "abdomenct1k"}[entry["dataset"]]


def test_rerun_resumes_and_rewrites_nothing(prepared, datasets, capsys):
    out = prepared[0]
    pngs = {str(p): p.stat().st_mtime_ns for p in out.rglob("*.png")}
    splits = (out / "splits.json").read_bytes()
    code = main(["prepare", "--all", "--config", str(datasets[1]), "--out", str(out), "--workers", "2",
                 "--strict"])
    assert code == 1  # --strict: the corrupt volume is still there
    assert _read(out / "summary.json")["run"] == {"prepared": 0, "resumed": 12, "failed": 1}
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*.png")} == pngs
    assert (out / "splits.json").read_bytes() == splits
    printed = capsys.readouterr().out
    assert "12 volumes already prepared" in printed and "Slices per split" in printed
    assert "pancreas_099" in printed


def test_a_deleted_record_file_redoes_only_that_volume(datasets, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "--dataset", "abdomenct1k", "--root", str(datasets[0] / "abd"), "--out", str(out),
            "--workers", "1", "--quiet"]
    assert main(args) == 0
    (out / "abdomenct1k" / "records" / "Case_00002_0000.json").unlink()
    assert main(args) == 0
    assert _read(out / "summary.json")["run"] == {"prepared": 1, "resumed": 2, "failed": 0}
    entries = _read(out / "tasks" / "multi_organ_abdomenct1k_train.json")
    assert {e["organ"] for e in entries} == {"liver", "kidney", "spleen", "pancreas"}


def test_help_works(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["prepare", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert "--dataset" in text and "--root" in text and "--threshold" in text
    assert main([]) == 0 and "prepare" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--dataset", "msd", "--root", "{tmp}/missing"], "missing does not exist"),
    (["--dataset", "msd", "--root", "{tmp}"], "No msd volumes found"),
    (["--dataset", "msd"], "--root is required"),
    (["--all"], "--all needs --config"),
    (["--dataset", "msd", "--root", "{tmp}", "--threshold", "1.5"], "--threshold must be in [0, 1)"),
    (["--dataset", "msd", "--root", "{tmp}", "--val-ratio", "-0.1"], "--val-ratio must be >= 0"),
    (["--dataset", "msd", "--root", "{tmp}", "--test-ratio", "0.5", "--val-ratio", "0.5"],
     "(--test-ratio + --val-ratio < 1), got 0.5 with --test-ratio 0.5"),
])
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "data").mkdir()
    out = ["--out", str(tmp_path / "out")]
    code = main(["prepare"] + [a.replace("{tmp}", str(tmp_path / "data")) for a in args] + out)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and message in captured.err and "Traceback" not in captured.err


def test_output_inside_a_dataset_folder_is_refused(datasets, capsys):
    root = datasets[0] / "msd"
    before = _snapshot(root)
    code = main(["prepare", "--dataset", "msd", "--root", str(root), "--out", str(root / "prepared")])
    assert code == 2 and "never writes inside a dataset folder" in capsys.readouterr().err
    assert _snapshot(root) == before


def test_val_ratio_in_the_config_is_validated(tmp_path, capsys):
    config = tmp_path / "prepare.json"
    config.write_text(json.dumps({"roots": {"msd": "data"}, "test_ratio": 0.2, "val_ratio": 0.8}))
    code = main(["prepare", "--all", "--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "got 0.8 with --test-ratio 0.2" in err


@pytest.fixture(scope="module")
def prepared_val(prepared, datasets, tmp_path_factory):
    """The prepared output copied and re-run with --val-ratio 0.25 (the volumes resume; the split changes)."""
    out = tmp_path_factory.mktemp("prepared_val") / "out"
    shutil.copytree(prepared[0], out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["prepare", "--all", "--config", str(datasets[1]), "--out", str(out), "--val-ratio", "0.25",
                     "--workers", "1"])
    return out, code, printed.getvalue()


def _task_files(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / "tasks").glob("*.json"))}


def test_without_val_ratio_there_is_no_val_split(prepared):
    out = prepared[0]
    assert "val_ratio" not in _read(out / "splits.json") and "val_ratio" not in _read(out / "summary.json")["options"]
    assert not list((out / "tasks").glob("*_val.json"))


def test_val_is_held_out_from_train_and_the_test_split_does_not_move(prepared, prepared_val):
    out, code, printed = prepared_val
    assert code == 0 and "changed split since the last run" in printed  # a changed val_ratio is not silent
    before, document = _read(prepared[0] / "splits.json"), _read(out / "splits.json")
    assert document["val_ratio"] == 0.25
    for dataset, by_split in document["splits"].items():
        assert by_split["test"] == before["splits"][dataset]["test"]
        assert by_split["val"] and set(by_split["train"]) | set(by_split["val"]) == set(
            before["splits"][dataset]["train"])
    split = {(d, v): s for d, by in document["splits"].items() for s, vs in by.items() for v in vs}
    for group in document["duplicate_groups"]:
        assert len({split[(m["dataset"], m["volume"])] for m in group}) == 1
    old_files, files = _task_files(prepared[0]), _task_files(out)
    assert {name for name in files if name.endswith("_test.json")} == {n for n in old_files if n.endswith("_test.json")}
    for name in (n for n in old_files if n.endswith("_test.json")):
        assert files[name] == old_files[name]  # the test sets are byte for byte those of a run without val
        assert name.replace("_test", "_val") in files
    for name in files:
        wanted = name.rsplit("_", 1)[1].removesuffix(".json")
        assert {split[(_dataset(e), e["volume"])] for e in _read(out / "tasks" / name)} <= {wanted}
    assert _read(out / "tasks" / "pancreas_detection_msd_val.json")


def test_the_summary_counts_val(prepared_val):
    out, _, printed = prepared_val
    summary = _read(out / "summary.json")
    assert summary["options"]["val_ratio"] == 0.25
    assert [r["split"] for r in summary["table"] if (r["dataset"], r["structure"]) == ("msd", "tumor")] == [
        "train", "val", "test"]
    assert summary["tasks"]["tumor_detection_msd"]["val"] > 0
    assert "train  val  test" in printed


def test_rerunning_without_val_removes_the_val_sets_and_restores_the_outputs(prepared, prepared_val, datasets,
                                                                             tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(prepared_val[0], out)
    assert main(["prepare", "--all", "--config", str(datasets[1]), "--out", str(out), "--workers", "1"]) == 0
    assert "changed split since the last run" in capsys.readouterr().out
    assert (out / "splits.json").read_bytes() == (prepared[0] / "splits.json").read_bytes()
    assert _task_files(out) == _task_files(prepared[0])  # no stale _val.json left to pick epochs on


def _slab(phantom, keep: slice, source=None, replace: slice | None = None):
    """The phantom cut to slices `keep` (LPS: k is the model slice), with slices `replace` taken from `source`."""
    arrays = {}
    for name in ("hu", "labels", "organs", "kidney_sides"):
        array = getattr(phantom, name).copy()
        if replace is not None:
            array[replace] = getattr(source, name)[replace]
        arrays[name] = array[keep]
    return dataclasses.replace(phantom, **arrays)


def _prepare_quietly(args: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(["prepare", *args, "--workers", "1", "--quiet"])
    return code, printed.getvalue()


def test_cropped_and_offset_copies_are_grouped_and_reported_in_the_summary(tmp_path):
    first, second = _phantom(51), _phantom(52)
    write_msd(tmp_path / "msd", [first, second, _phantom(53)])
    cropped = _slab(first, slice(1, -1))  # one slice less at each end: the other slices byte-identical
    offset = dataclasses.replace(second, hu=second.hu + 1000)  # stored with another intercept
    write_abdomenct1k(tmp_path / "abd", [cropped, offset, _phantom(54)])
    config = tmp_path / "prepare.json"
    config.write_text(json.dumps({"roots": {"msd": "msd", "abdomenct1k": "abd"}, "seed": 42}))
    code, printed = _prepare_quietly(["--all", "--config", str(config), "--out", str(tmp_path / "out")])
    assert code == 0, printed
    groups = _read(tmp_path / "out" / "summary.json")["duplicate_groups"]
    assert [[(m["dataset"], m["volume"], m["match"]) for m in g] for g in groups] == [
        [("msd", "pancreas_001", "slices"), ("abdomenct1k", "Case_00001_0000", "slices")],
        [("msd", "pancreas_002", "slices"), ("abdomenct1k", "Case_00002_0000", "slices")]]


def test_a_test_slice_trained_on_elsewhere_stops_prepare_before_it_writes_any_set(tmp_path):
    first, second = _phantom(61), _phantom(62)
    write_msd(tmp_path / "msd", [first, second])
    # mostly the second scan, two slices of the first: too few shared slices to be grouped with the first
    write_abdomenct1k(tmp_path / "abd", [_slab(second, slice(None), first, slice(7, 9))])
    config = tmp_path / "prepare.json"
    config.write_text(json.dumps({"roots": {"msd": "msd", "abdomenct1k": "abd"}, "seed": 42, "threshold": 0.1,
                                  "test_ratio": 0.5}))
    code, printed = _prepare_quietly(["--all", "--config", str(config), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "test slices have the same content as training slices" in printed and "slice 7" in printed
    assert "remove one of the copies" in printed and "Traceback" not in printed
    assert not (tmp_path / "out" / "splits.json").exists() and not (tmp_path / "out" / "tasks").exists()
