"""`minigpt-pancreas predict` and `demo` with a hostile --out, run as a user runs them with the bundled demo model:
a folder replaced whole never takes the user's files with it, and an --out that cannot be written is one line
before the model runs, or one line after a write fails midway, with the earlier output untouched."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
from contextlib import contextmanager

import pytest
import SimpleITK as sitk

from backend import cli
from SlicerMiniGPTPancreas import phantom, phantom_writers

pytestmark = pytest.mark.slow
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits and resource limits")


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A small CT file (48 x 48 x 20 voxels): one slice takes the bundled model a few seconds."""
    path = tmp_path_factory.mktemp("vols") / "ok.nii.gz"
    ct = phantom.make_phantom(seed=1, spacing=(6.0, 6.0, 10.0), noise_hu=0.0)
    sitk.WriteImage(phantom_writers.to_sitk_image(ct), str(path))
    return path


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _predict(volume, out, *extra: str) -> int:
    return cli.main(["predict", str(volume), "--slices", "0", "--out", str(out), *extra])


def _earlier_output(volume, out, capsys) -> None:
    assert _predict(volume, out) == 0
    capsys.readouterr()  # its progress bar


def _one_line_error(capsys) -> str:
    """The error line; no traceback and no progress bar, so the model never ran."""
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def _contents(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_input_volume_inside_the_earlier_output_is_refused_and_kept(volume, tmp_path, capsys):
    out = tmp_path / "pred"
    _earlier_output(volume, out, capsys)
    shutil.copy(volume, out / "my_ct.nii.gz")
    before = _contents(out)
    assert _predict(out / "my_ct.nii.gz", out) == 2
    error = _one_line_error(capsys)
    assert "my_ct.nii.gz is inside --out" in error and "choose another --out" in error
    assert _contents(out) == before


def test_user_files_in_an_earlier_output_are_named_and_kept(volume, tmp_path, capsys):
    out = tmp_path / "pred"
    _earlier_output(volume, out, capsys)
    (out / "notes.txt").write_text("notes")
    (out / "overlays" / "annotated.png").write_bytes(b"my drawing")
    before = _contents(out)
    assert _predict(volume, out) == 2
    error = _one_line_error(capsys)
    assert "(notes.txt, overlays/annotated.png)" in error and "move them out" in error
    assert _contents(out) == before


@posix_only
def test_an_earlier_output_is_replaced_whole_and_readable_by_others(volume, tmp_path, capsys, umask_022):
    out = tmp_path / "pred"
    assert _predict(volume, out, "--cascade") == 0
    assert _predict(volume, out) == 0  # a one-question run replaces the cascade's output, and the reverse
    assert _predict(volume, out, "--cascade") == 0
    assert "cascade" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "answers.json", "boxes.csv", "boxes.mrk.json", "overlays", "summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["pred"]  # no staging or retired folder left
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # like any new folder, not mkdtemp's private 0o700


def test_an_output_below_a_file_is_refused_before_the_model_runs(volume, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    assert _predict(volume, blocker / "pred") == 2
    error = _one_line_error(capsys)
    assert f"{blocker} is a file, not a folder" in error and "choose another --out" in error
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and blocker.read_text() == "not a folder"


@contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail (EFBIG) as on a full disk: a real limit of the OS that binds root too."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


@posix_only
def test_a_write_that_fails_midway_is_one_line_and_keeps_the_earlier_output(volume, tmp_path, capsys):
    out = tmp_path / "pred"
    _earlier_output(volume, out, capsys)
    before = _contents(out)
    with file_size_limit(100):
        assert _predict(volume, out) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: the model ran
    assert f"cannot write --out {out}: File too large" in error and "choose another --out" in error
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pred"]  # the staging folder is gone


def test_demo_refuses_a_folder_holding_other_files(tmp_path, capsys):
    (tmp_path / "thesis.docx").write_text("years of work")
    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    error = _one_line_error(capsys)
    assert "holds files minigpt-pancreas demo did not write (thesis.docx)" in error
    assert (tmp_path / "thesis.docx").read_text() == "years of work"


@posix_only
def test_demo_on_a_full_disk_says_so_and_leaves_nothing(tmp_path, capsys):
    with file_size_limit(100):
        assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # SimpleITK's NIfTI writer logs its own line first
    assert f"cannot write --out {tmp_path / 'demo'}: phantom_ct.nii.gz was not written whole" in error
    assert "Free disk space" in error and not list(tmp_path.iterdir())
