"""The errors of ``mhc_compile.io``: :class:`MHCIOError` (a file cannot be read or written) and
:class:`MHCUsageError` (arguments that do not make sense together), and (re-exported from
``mhc_compile.messages``) :func:`first_line`, how an underlying exception is quoted in their
one-line messages."""
from __future__ import annotations

from ..messages import first_line  # noqa: F401 (re-exported for the io modules)


class MHCIOError(RuntimeError):
    """A source or destination could not be read or written; the message is one line naming the file."""


class MHCUsageError(MHCIOError):
    """The arguments do not make sense together (the CLI exits with code 2)."""
