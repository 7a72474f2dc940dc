"""Text laid out to show (class names may hold wide or combining characters), sizes, and the first line of an
error; escaping what cannot be shown is ``finetune.core.io.printable``."""
from __future__ import annotations

import unicodedata

from finetune.core.io import human_size      # (the one size formatter: progress lines use it too)

__all__ = ["cell_width", "pad", "human_size", "first_line"]


def cell_width(text: str) -> int:
    """The terminal cells ``text`` takes: a mark drawn on the character before it none (``café`` decomposed is
    4; Unicode categories Mn and Me, as wcwidth counts them: Thai and Devanagari vowel signs too, whose
    combining class is 0), a wide East Asian character two (``猫`` is 2), any other character one. For columns of
    user-named things (class names)."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me") else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def pad(text: str, width: int) -> str:
    """``text`` followed by spaces up to ``width`` terminal cells (:func:`cell_width`), as ``str.ljust`` does
    for ASCII."""
    return text + " " * max(0, width - cell_width(text))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
