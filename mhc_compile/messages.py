"""How mhc-compile quotes other code's errors inside its own messages: the first line, shortened.

Torch's export and Dynamo errors run to pages; mhc-compile's own errors say what to do and quote
only the first line of the cause (the full cause stays chained as ``__cause__``).
"""
from __future__ import annotations

from typing import Optional


def first_line(cause: object, limit: Optional[int] = None) -> str:
    """The first non-empty line of an exception's (or any object's) text, cut to ``limit`` chars.

    An exception with no text gives its type's name.
    """
    text = str(cause).strip()
    line = text.splitlines()[0] if text else (type(cause).__name__ if isinstance(cause, BaseException) else "")
    return line[:limit] if limit is not None else line
