"""Write files whole or not at all: the one "temporary file beside the target, then `os.replace`" of the project.

A file is written under a hidden temporary name in the target's folder and renamed over the target, which is
atomic on one file system: a reader sees the old file or the new one, never a half-written one, and a failed or
interrupted write (bad input, full disk, Ctrl-C) leaves the previous file untouched and no temporary file behind.

The temporary name is `.tmp-<hex>-<target name>`: it keeps the target's whole suffix (`.nii.gz`, `.mrk.json`),
because writers such as SimpleITK pick the file format from the extension. The new file gets the permissions of
any newly created file (0o666 less the umask, 0o644 with the usual umask 022), not the private 0o600 of
`tempfile.mkstemp`: model folders and datasets are meant to be shared.

No `fsync`: the guarantee is against the writing process failing or being stopped, not against a power cut or
an operating-system crash, after which a just-renamed file may be empty. Syncing every file would make `prepare`
(thousands of small PNGs) and the test suite much slower for a case a re-run repairs.

Folders the same way (`staged_folder`): built in a hidden staging folder beside the target and swapped into place
only when complete, so a failed run never leaves a half-written folder and never loses the previous one. The
previous folder is replaced whole, so callers check first that it holds nothing but their own earlier output;
`check_can_stage` lets them find an unwritable target before a long job rather than after it. The folder gets the
permissions of any new folder (0o777 less the umask), not the private 0o700 of `tempfile.mkdtemp`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "check_can_stage", "staged_folder"]


def atomic_write(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` to write the file, then rename it over `target`; return `target` as a Path.

    The target's folder must exist (an OSError such as FileNotFoundError otherwise). `write` gets an empty file
    at a path beside the target with the target's suffix; it may overwrite or recreate it. On any exception,
    from `write` or from the rename, the temporary file is removed and the exception re-raised.
    """
    target = Path(target)
    temporary = target.with_name(f".tmp-{secrets.token_hex(6)}-{target.name}")
    # O_EXCL: never reuse an existing file. Mode 0o666 is reduced by the umask, as for any new file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            new_file_mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        write(temporary)
        os.chmod(temporary, new_file_mode)  # in case the writer recreated the file with other permissions
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(target: str | os.PathLike, data: bytes, only_if_changed: bool = False) -> Path:
    """Write `data` to `target` atomically, creating missing parent folders; return `target` as a Path.

    only_if_changed: leave an existing file with exactly these bytes alone, its modification time included, so
    that a re-run does not look like new output to make-like tools.
    """
    target = Path(target)
    if only_if_changed and target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda temporary: temporary.write_bytes(data))


@contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`, on any error it is removed."""
    out = Path(out).absolute()
    staging = _new_staging_folder(out)
    try:
        yield staging
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_can_stage(out: str | os.PathLike) -> None:
    """Raise now the OSError that `staged_folder(out)` would raise on entry (a file in the way, a read-only or
    full file system, no permission): create the missing parent folders and a staging folder, then remove it."""
    _new_staging_folder(Path(out).absolute()).rmdir()


def _new_staging_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".tmp-{out.name}-{secrets.token_hex(6)}")
    staging.mkdir(0o777)  # reduced by the umask, as for any new folder: outputs are meant to be shared
    return staging


def _swap_into_place(staging: Path, out: Path) -> None:
    """An earlier output is removed only after the new one is in its place, and put back if that fails."""
    if not out.exists():
        os.replace(staging, out)
        return
    retired = out.with_name(f".old-{secrets.token_hex(8)}-{out.name}")
    os.replace(out, retired)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
