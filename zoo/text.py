"""Text safe to show: class names and file names may hold anything a file system allows."""
from __future__ import annotations

from finetune.io import printable_name  # torch-free: `zoo list` may use it

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` on one visible line: control and other invisible characters as escapes (``\\n``,
    ``\\x1b``, ``\\u200b``), undecodable file-name bytes as ``\\xNN``; everything printable unchanged
    (``café 猫 ✓`` stays as it is)."""
    s = printable_name(str(text))
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
