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


class UserError(Exception):
    """An error the user can fix; `str(error)` is the whole message: what is wrong and what to do."""
