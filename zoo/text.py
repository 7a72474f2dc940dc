"""Text safe to show: class names and file names may hold anything a file system allows."""
from __future__ import annotations


def _unsurrogate(text: str) -> str:
    # The same as finetune.data._printable (non-UTF-8 file names arrive as surrogate escapes: show their
    # bytes); not imported from there because finetune.data imports torch and `zoo list` must not.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` on one visible line: control and other invisible characters as escapes (``\\n``,
    ``\\x1b``, ``\\u200b``), undecodable file-name bytes as ``\\xNN``; everything printable unchanged
    (``café 猫 ✓`` stays as it is)."""
    s = _unsurrogate(str(text))
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
