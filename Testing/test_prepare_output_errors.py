"""`prepare` when its output cannot be written: one line naming the path, exit 2, no traceback, nothing
half-written, and the same command resumes once the cause is gone."""

from __future__ import annotations

import pytest

from SlicerMiniGPTPancreas.phantom import make_phantom
from SlicerMiniGPTPancreas.phantom_writers import write_abdomenct1k
from training.cli import main

SMALL = {"size_mm": (150.0, 120.0, 80.0), "spacing": (3.0, 4.0, 5.0)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("abd")
    write_abdomenct1k(base, [make_phantom(seed, **SMALL) for seed in (51, 52)])
    return base


def _prepare(root, out):
    return main(["prepare", "--dataset", "abdomenct1k", "--root", str(root), "--out", str(out), "--workers", "1",
                 "--quiet"])


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    return error


def test_an_output_below_a_file_is_one_line_and_exit_2(root, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    assert _prepare(root, blocker / "prepared") == 2
    error = _one_line_error(capsys)
    assert f"cannot write {blocker / 'prepared'}" in error and "choose another --out" in error
    assert blocker.read_text() == "not a folder"


def test_a_write_that_fails_midway_leaves_whole_files_and_the_rerun_resumes(root, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "splits.json").mkdir(parents=True)  # in the way of the split, written after every volume is done
    assert _prepare(root, out) == 2
    error = _one_line_error(capsys)
    assert f"cannot write {out / 'splits.json'}" in error and "the same command resumes" in error
    assert not list(out.rglob(".tmp-*"))  # no half-written file
    assert len(list((out / "abdomenct1k" / "records").glob("*.json"))) == 2  # both volumes were finished
    (out / "splits.json").rmdir()
    assert _prepare(root, out) == 0
    assert "2 volumes already prepared" in capsys.readouterr().out and (out / "splits.json").is_file()
