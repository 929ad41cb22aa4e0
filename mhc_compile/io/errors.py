"""The errors of ``mhc_compile.io``: :class:`MHCIOError` (a file cannot be read or written) and
:class:`MHCUsageError` (arguments that do not make sense together), and :func:`first_line`,
how an underlying exception is quoted in their one-line messages."""
from __future__ import annotations


class MHCIOError(RuntimeError):
    """A source or destination could not be read or written; the message is one line naming the file."""


class MHCUsageError(MHCIOError):
    """The arguments do not make sense together (the CLI exits with code 2)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
