"""Streamed text that is never taken back: the one rule chat, the server and the terminal share.

Text decoded from a growing answer can still change at its end: a stop string may be forming, a
character split over byte-fallback tokens decodes to U+FFFD until its last byte arrives, and a
clean-up (ChatGLM's full-width punctuation) may still rewrite the last character. `TextStream`
releases only the part that can no longer change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, if one does."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(cuts) if cuts else None


def held_back(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text safe to show, whether a stop string ended it).

    A tail that could still grow into a stop string is withheld, so streamed text is never retracted."""
    cut = first_stop(text, stops)
    if cut is not None:
        return text[:cut], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


def _unchanged(text: str) -> str:
    return text


@dataclass
class TextStream:
    """Feed it the whole answer so far after each token (`update`) and once at the end (`finish`); each call
    returns only the newly settled text. `hold_last`: the last character may still change (a clean-up
    that looks at its neighbour), so it is released only at the end."""

    stops: Sequence[str] = ()
    clean: Callable[[str], str] = _unchanged
    hold_last: bool = False
    shown: str = ""  # everything released so far
    stopped: bool = False  # a stop string ended the answer
    final: str = ""  # the whole answer, once `finish` has seen it

    def update(self, text: str) -> str:
        """The newly settled part of `text` (the decoded answer so far), or ""."""
        cut, self.stopped = held_back(text, self.stops)
        settled = self.clean(cut)
        if self.hold_last and not self.stopped:
            settled = settled[:-1]
        return "" if settled.endswith("\ufffd") else self._release(settled)

    def finish(self, text: str) -> str:
        """The rest of the final answer `text`: cut at a stop string (a tail that only began one is kept:
        the answer ended without it), cleaned."""
        cut = first_stop(text, self.stops)
        self.stopped = self.stopped or cut is not None
        self.final = self.clean(text if cut is None else text[:cut])
        return self._release(self.final)

    def _release(self, settled: str) -> str:
        if not settled.startswith(self.shown) or len(settled) <= len(self.shown):
            return ""
        delta, self.shown = settled[len(self.shown):], settled
        return delta
