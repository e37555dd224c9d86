"""What glmkit needs of a tokenizer, so callers are typed against the idea, not ChatGLM-6B's class."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from glmkit.models.positions import SpecialIds


@runtime_checkable
class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def convert_tokens_to_ids(self, tokens: str) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_ids(self) -> SpecialIds:
        """The ids that shape GLM's positions and masks ([gMASK], <sop>, ...)."""
        ...

    def save_pretrained(self, directory: str | os.PathLike) -> Path: ...
