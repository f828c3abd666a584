"""Errors shown to the user as one line, and the guard that turns them into an exit status."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad arguments or input: shown to the user as one line, exit status 2."""


def one_line(exc: BaseException) -> str:
    """An exception's message for the user: a KeyError's key without the quotes ``str()``
    adds around its argument (other messages as they are, quotes inside them kept)."""
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        return str(exc.args[0])
    return str(exc)


def run_guarded(fn, argv, prog: str) -> int:
    """Call ``fn(argv)``, turning :class:`UsageError` into a one-line message and exit status 2."""
    try:
        return int(fn(argv) or 0)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
