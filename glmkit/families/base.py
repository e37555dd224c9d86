"""What a model family is to glmkit: how its checkpoints map onto glmkit's one model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.models.config import ConfigError, GLMConfig
from glmkit.text.chat_format import ChatFormat
from glmkit.text.protocol import Tokenizer


class UnknownFamilyError(ConfigError):
    """A config.json that is no family glmkit knows; the message names what was found."""


@dataclass(frozen=True)
class Family:
    """One GLM generation. `matches` reads config.json as it is on disk; everything after that uses
    glmkit's internal config (GLMConfig) and parameter names (glmkit.models.names)."""

    name: str
    summary: str
    matches: Callable[[Mapping[str, Any]], bool]
    position_layout: str  # a name of glmkit.models.positions.LAYOUTS
    chat_format: ChatFormat
    load_tokenizer: Callable[[Path], Tokenizer]
    tokenizer_files: tuple[str, ...]  # what travels with the weights when a model is saved
    # Checkpoint name prefix -> internal name prefix, applied in order when loading (inverted when saving).
    renames: tuple[tuple[str, str], ...] = ()
    # Checkpoint tensors glmkit recomputes or does not use (name suffixes): skipped when loading.
    ignored: tuple[str, ...] = ()

    def config(self, data: Mapping[str, Any]) -> GLMConfig:
        """config.json's keys as glmkit's config."""
        config = GLMConfig.from_dict(dict(data))
        if config.position_layout != self.position_layout:
            raise ConfigError(f"a {self.name} config must give {self.position_layout} positions, "
                              f"not {config.position_layout}")
        return config

    def ignores(self, checkpoint_name: str) -> bool:
        return checkpoint_name.endswith(self.ignored) if self.ignored else False

    def internal_name(self, checkpoint_name: str) -> str:
        return _rename(checkpoint_name, self.renames)

    def checkpoint_name(self, internal_name: str) -> str:
        return _rename(internal_name, tuple((new, old) for old, new in self.renames))


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name
