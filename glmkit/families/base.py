"""What a model family is to glmkit: how its checkpoints map onto glmkit's one model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmkit.models import names
from glmkit.models.config import ConfigError, GLMConfig
from glmkit.text.protocol import Tokenizer


class UnknownFamilyError(ConfigError):
    """A config.json that is no family glmkit knows; the message names what was found."""


class LayoutError(ConfigError):
    """Checkpoint tensors that do not make up the family's layout (a part missing, layouts mixed)."""


@dataclass(frozen=True)
class Fusion:
    """Tensors a checkpoint stores apart and glmkit keeps as one, in a block: transformers' q_proj, k_proj and
    v_proj are glmkit's query_key_value (rows [q | k | v]). Paths are relative to the block."""

    internal: str  # "attention.query_key_value"
    parts: tuple[str, ...]  # ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), in row order
    rows: Callable[[GLMConfig], tuple[int, ...]]  # each part's rows (to split it again when saving)


@dataclass(frozen=True)
class Family:
    """One GLM generation. `matches` reads config.json as it is on disk; everything after that uses
    glmkit's internal config (GLMConfig) and parameter names (glmkit.models.names)."""

    name: str
    summary: str
    matches: Callable[[Mapping[str, Any]], bool]
    position_layout: str  # a name of glmkit.models.positions.LAYOUTS
    load_tokenizer: Callable[[Path], Tokenizer]
    tokenizer_files: tuple[str, ...]  # what travels with the weights when a model is saved
    # Checkpoint name prefix -> internal name prefix, applied in order when loading (inverted when saving).
    renames: tuple[tuple[str, str], ...] = ()
    # Checkpoint tensors glmkit recomputes or does not use (name suffixes): skipped when loading.
    ignored: tuple[str, ...] = ()
    # Inside a block (after `renames` has made the prefix glmkit's `transformer.layers.N.`): checkpoint path
    # prefix -> internal one ("self_attn.o_proj." -> "attention.dense."), and tensors stored apart (Fusion).
    block_renames: tuple[tuple[str, str], ...] = ()
    fusions: tuple[Fusion, ...] = ()
    # config.json as it is on disk -> glmkit's keys (GLMConfig.from_dict), and a GLMConfig -> the family's own
    # config.json; None: the family's config.json is glmkit's (ChatGLM-6B's keys).
    # read_config also gets the directory config.json came from, when there is one (what the tokenizer files say
    # about the generation: ChatGLM2 and ChatGLM3 share config.json's keys but not all their meanings).
    read_config: Callable[[Mapping[str, Any], Path | None], dict[str, Any]] | None = None
    write_config: Callable[[GLMConfig], dict[str, Any]] | None = None
    # config.json key -> GLMConfig field, where read_config renames one: errors name the key the file has.
    renamed_keys: tuple[tuple[str, str], ...] = ()

    def config(self, data: Mapping[str, Any], directory: Path | None = None) -> GLMConfig:
        """config.json's keys (from DIRECTORY, when known) as glmkit's config."""
        try:
            config = GLMConfig.from_dict(self.read_config(data, directory) if self.read_config else dict(data))
        except ConfigError as e:
            raise ConfigError(self._in_file_terms(str(e), data)) from e
        if config.position_layout != self.position_layout:
            raise ConfigError(f"a {self.name} config must give {self.position_layout} positions, "
                              f"not {config.position_layout}")
        return config

    def _in_file_terms(self, message: str, data: Mapping[str, Any]) -> str:
        """A message that starts with a GLMConfig field read from a renamed config.json key names that key."""
        for key, field_name in self.renamed_keys:
            if key in data and message.startswith(f"{field_name} "):
                return f"{key} (glmkit's {field_name}){message[len(field_name):]}"
        return message

    def config_json(self, config: GLMConfig) -> dict[str, Any]:
        """What the family's config.json holds for `config` (what save_pretrained writes)."""
        return self.write_config(config) if self.write_config else config.to_dict()

    def ignores(self, checkpoint_name: str) -> bool:
        return checkpoint_name.endswith(self.ignored) if self.ignored else False

    def internal_name(self, checkpoint_name: str) -> str:
        name = _rename(checkpoint_name, self.renames)
        block, rest = _split_block(name)
        return name if block is None else block + _rename(rest, self.block_renames)

    def checkpoint_name(self, internal_name: str) -> str:
        block, rest = _split_block(internal_name)
        name = internal_name if block is None else block + _rename(rest, _inverse(self.block_renames))
        return _rename(name, _inverse(self.renames))

    def internal_tensors(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """A checkpoint's (name, tensor) pairs under glmkit's internal names, parts fused as they complete (a
        layer's q/k/v may lie in different shards: only the parts waiting for their siblings are held)."""
        waiting: dict[str, list[torch.Tensor | None]] = {}
        for stored, tensor in tensors:
            if self.ignores(stored):
                continue
            name = self.internal_name(stored)
            fused = self.fusion_slot(name)
            if fused is None:
                yield name, tensor
                continue
            target, index, count = fused
            parts = waiting.setdefault(target, [None] * count)
            if parts[index] is not None:
                raise LayoutError(f"the checkpoint holds {stored!r} twice")
            parts[index] = tensor
            if all(part is not None for part in parts):
                del waiting[target]
                yield target, torch.cat(parts, dim=0)
        if waiting:
            target, parts = next(iter(waiting.items()))
            present = [self.checkpoint_name(target) + f" part {i}" for i, t in enumerate(parts) if t is not None]
            raise LayoutError(f"the checkpoint has only some of the tensors fused into {target} ({', '.join(present)}); "
                              f"a {self.name} checkpoint stores every part: it is incomplete or mixes layouts")

    def checkpoint_tensors(self, state: Iterable[tuple[str, torch.Tensor]],
                           config: GLMConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """glmkit's (internal name, tensor) pairs as the family's checkpoint stores them: renamed, fused
        tensors split into their parts again."""
        for name, tensor in state:
            block, rest = _split_block(name)
            fusion = None if block is None else next(
                (f for f in self.fusions if rest.startswith(f"{f.internal}.")), None)
            if fusion is None:
                yield self.checkpoint_name(name), tensor
                continue
            suffix = rest[len(fusion.internal):]
            for part, piece in zip(fusion.parts, tensor.split(list(fusion.rows(config)), dim=0), strict=True):
                yield _rename(block + part + suffix, _inverse(self.renames)), piece

    def fusion_slot(self, name: str) -> tuple[str, int, int] | None:
        block, rest = _split_block(name)
        if block is None:
            return None
        for fusion in self.fusions:
            for index, part in enumerate(fusion.parts):
                if rest.startswith(f"{part}."):
                    return block + fusion.internal + rest[len(part):], index, len(fusion.parts)
        return None


def _split_block(name: str) -> tuple[str | None, str]:
    """("transformer.layers.N.", rest) for a name inside block N, else (None, name)."""
    prefix = f"{names.BLOCKS}."
    if not name.startswith(prefix):
        return None, name
    number, _, rest = name[len(prefix):].partition(".")
    return (f"{prefix}{number}.", rest) if number.isdigit() else (None, name)


def _inverse(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((new, old) for old, new in pairs)


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name
