"""Which writing system a text is in (plain Python, no torch)."""

from __future__ import annotations


def is_cjk(text: str) -> bool:
    """True for a non-empty text of CJK unified ideographs only (U+4E00..U+9FFF)."""
    return bool(text) and all("\u4e00" <= ch <= "\u9fff" for ch in text)
