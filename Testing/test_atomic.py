"""Atomic file writes (`SlicerMiniGPTPancreas.atomic`): whole file or the previous one, never a half file or a
stray temporary; the target's suffix kept for format-by-extension writers; ordinary file permissions."""

from __future__ import annotations

import gzip
import os
import stat
import sys

import numpy as np
import pytest

from SlicerMiniGPTPancreas.atomic import atomic_write, atomic_write_bytes, check_can_stage, staged_folder

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def umask():
    """`os.umask`, for setting the process umask in one test; the previous umask is restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_replace_the_file_and_leave_nothing_else(tmp_path):
    target = tmp_path / "records.json"
    target.write_bytes(b"old")
    assert atomic_write_bytes(target, b'{"new": 1}\n') == target
    assert target.read_bytes() == b'{"new": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["records.json"]


def test_callable_writes_a_hidden_temporary_beside_the_target_that_keeps_the_suffix(tmp_path):
    seen = []

    def write(temporary):
        seen.append(temporary)
        temporary.write_text("text")

    target = tmp_path / "boxes.mrk.json"
    assert atomic_write(str(target), write) == target  # a str target is accepted, a Path returned
    (temporary,) = seen
    assert temporary.parent == tmp_path and temporary.name.startswith(".tmp-")
    assert temporary.name.endswith("-boxes.mrk.json") and not temporary.exists()
    assert target.read_text() == "text"


def test_simpleitk_writes_compressed_nifti_through_the_kept_suffix(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 1000  # [k, j, i]
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.75, 0.8, 2.5))
    target = tmp_path / "pancreas_001.nii.gz"
    atomic_write(target, lambda temporary: sitk.WriteImage(image, str(temporary), True))
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip: ITK chose the compressed NIfTI from ".nii.gz"
    assert len(gzip.decompress(target.read_bytes())) >= 348 + volume.nbytes  # NIfTI-1 header + the voxels
    back = sitk.ReadImage(str(target))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume)
    assert back.GetSpacing() == pytest.approx((0.75, 0.8, 2.5))
    assert [p.name for p in tmp_path.iterdir()] == ["pancreas_001.nii.gz"]


@pytest.mark.parametrize("failure", [ValueError("writer failed"), KeyboardInterrupt()])
def test_failing_writer_keeps_the_previous_file_and_removes_its_temporary(tmp_path, failure):
    target = tmp_path / "checkpoint_0.pth"
    target.write_bytes(b"previous checkpoint")

    def write_half_then_fail(temporary):
        temporary.write_bytes(b"half of the new")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, write_half_then_fail)
    assert target.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_0.pth"]


def test_failing_rename_removes_the_temporary(tmp_path):
    occupied = tmp_path / "model_epoch_0"  # a non-empty folder cannot be replaced by a file
    occupied.mkdir()
    (occupied / "kept.txt").write_text("kept")
    with pytest.raises(OSError):
        atomic_write_bytes(occupied, b"file")
    assert [p.name for p in tmp_path.iterdir()] == ["model_epoch_0"]
    assert (occupied / "kept.txt").read_text() == "kept"


def test_bytes_create_missing_folders_but_the_callable_needs_its_folder(tmp_path):
    nested = tmp_path / "msd" / "records" / "pancreas_001.json"
    atomic_write_bytes(nested, b"[]\n")
    assert nested.read_bytes() == b"[]\n"
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "boxes.mrk.json", lambda temporary: temporary.write_text("x"))
    assert not (tmp_path / "missing").exists()


@posix_only
@pytest.mark.parametrize("process_umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_permissions_are_those_of_a_new_file_under_the_umask(tmp_path, umask, process_umask, expected):
    umask(process_umask)
    assert mode(atomic_write_bytes(tmp_path / "plain.bin", b"data")) == expected

    def write_private(temporary):  # a writer that recreates its file privately, as mkstemp-based writers do
        temporary.unlink()
        temporary.touch(mode=0o600)
        temporary.write_bytes(b"data")

    assert mode(atomic_write(tmp_path / "recreated.bin", write_private)) == expected


@posix_only
def test_tokenizer_files_in_a_model_folder_are_readable_by_others(tmp_path, umask):
    from backend.tiny import build_tiny_sentencepiece
    from backend.tokenizer import UpstreamLlamaTokenizer

    umask(0o022)
    model_file = build_tiny_sentencepiece(tmp_path / "llama")
    copy = UpstreamLlamaTokenizer(model_file).save(tmp_path / "model_dir")
    assert (mode(model_file), mode(copy)) == (0o644, 0o644)
    assert copy.read_bytes() == model_file.read_bytes()


def test_only_if_changed_leaves_an_identical_file_and_its_mtime_alone(tmp_path):
    target = tmp_path / "splits.json"
    atomic_write_bytes(target, b'{"train": [1]}\n')
    old_time = 1_000_000_000  # 2001: any fresh write would move it to now
    os.utime(target, (old_time, old_time))
    inode = target.stat().st_ino

    atomic_write_bytes(target, b'{"train": [1]}\n', only_if_changed=True)
    assert (target.stat().st_mtime, target.stat().st_ino) == (old_time, inode)

    atomic_write_bytes(target, b'{"train": [2]}\n', only_if_changed=True)  # changed: written
    assert target.read_bytes() == b'{"train": [2]}\n' and target.stat().st_mtime > old_time

    os.utime(target, (old_time, old_time))
    atomic_write_bytes(target, b'{"train": [2]}\n')  # identical, but not asked to skip: written again
    assert target.stat().st_mtime > old_time
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "results"
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "a.txt").write_text("half")
        raise KeyboardInterrupt  # Ctrl-C mid-write
    assert (out / "a.txt").read_text() == "first"  # the previous output is untouched
    with staged_folder(out) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no staging or retired folder left


@posix_only
@pytest.mark.parametrize("process_umask, expected", [(0o022, 0o755), (0o077, 0o700)])
def test_a_staged_folder_has_the_permissions_of_a_new_folder_under_the_umask(tmp_path, umask, process_umask,
                                                                            expected):
    umask(process_umask)
    with staged_folder(tmp_path / "results") as staging:
        (staging / "a.txt").write_text("first")
    assert mode(tmp_path / "results") == expected  # not mkdtemp's private 0o700 whatever the umask


def test_an_unusable_target_is_found_before_the_work_and_leaves_nothing(tmp_path):
    check_can_stage(tmp_path / "new" / "results")  # missing parents are created, the staging tried and removed
    assert [p.name for p in tmp_path.rglob("*")] == ["new"]
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OSError):
        check_can_stage(tmp_path / "notes.txt" / "results")  # a file where the folder should be
    assert (tmp_path / "notes.txt").read_text() == "keep me"
