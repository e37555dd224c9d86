"""Model families: the one table of GLM generations glmkit runs.

Each family is a module of its own (how its config keys, weight names, tokenizer, chat format and
position layout map onto glmkit's) and one entry of FAMILIES. Loading detects the family from
config.json; everything below the loader (quantization, tensor parallelism, LoRA, resharding) sees
only glmkit's internal config and parameter names. A new family is a new module and a new entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmkit.families import chatglm6b, glm130b
from glmkit.families.base import Family, UnknownFamilyError
from glmkit.models.config import GLMConfig

FAMILIES: dict[str, Family] = {family.name: family for family in (chatglm6b.FAMILY, glm130b.FAMILY)}

__all__ = ["FAMILIES", "Family", "UnknownFamilyError", "detect", "family_of"]


def detect(data: Mapping[str, Any]) -> Family:
    """The family of a config.json (as a dict), or one clear error naming what was found."""
    if not isinstance(data, Mapping):
        raise UnknownFamilyError(f"config.json holds a {type(data).__name__}, not an object of model settings")
    for family in FAMILIES.values():
        if family.matches(data):
            return family
    raise UnknownFamilyError(_not_known(data))


def family_of(config: GLMConfig) -> Family:
    """The family of a loaded model's config."""
    return detect(config.to_dict())


def _not_known(data: Mapping[str, Any]) -> str:
    found = f"model_type {data.get('model_type')!r}, architectures {data.get('architectures')!r}"
    newer = [k for k in chatglm6b.NEWER_GENERATION_KEYS if k in data]
    if data.get("model_type") in ("chatglm", "glm", "glm4") or newer:
        keys = f" ({', '.join(newer)})" if newer else ""
        return (f"this is a ChatGLM2/ChatGLM3/GLM-4 config{keys}: {found}; glmkit loads "
                f"{' and '.join(FAMILIES)} so far")
    return f"config.json describes no GLM family glmkit knows: {found}; glmkit loads {' and '.join(FAMILIES)}"
