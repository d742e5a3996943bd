"""`UserError`: the base of every error whose message is meant for the user.

A UserError says what is wrong with the user's input, files or settings and what to do about it; the entry points
(the `minigpt-pancreas` and `minigpt-pancreas-train` command lines, the HTTP service, the Slicer module) show its
message and nothing else. They catch only this class: any other exception, a ValueError or KeyError from numpy or
torch included, is a bug and keeps its traceback (the service answers it with a 500 that names a request id and
logs it in full).

The project's error classes derive from it. Those that were ValueErrors stay ValueErrors as well, so code that
catches ValueError around a call (argparse types, numeric parsers) keeps working; being a ValueError is no longer
what makes an error the user's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error the user can fix; `str(error)` is the whole message: what is wrong and what to do."""


@contextmanager
def write_errors_as(error_type: type[UserError], target: object, outcome: str) -> Iterator[None]:
    """Turn an OSError while writing `target` (no permission, a full disk, a file where a folder should be) into
    `error_type`: what failed and where, what to do, and `outcome`, what became of the output."""
    try:
        yield
    except OSError as error:
        raise error_type(f"cannot write {target}: {error.strerror or error}. Free disk space, fix the permissions or "
                         f"choose another --out; {outcome}") from error
