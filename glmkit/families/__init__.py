"""Model families: the one table of GLM generations glmkit runs.

Each family is a module of its own (how its config keys, weight names, tokenizer, chat format and
position layout map onto glmkit's) and one entry of FAMILIES. Loading detects the family from
config.json; everything below the loader (quantization, tensor parallelism, LoRA, resharding) sees
only glmkit's internal config and parameter names. A new family is a new module and a new entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmkit.families import chatglm2, chatglm6b, glm130b, transformers_glm
from glmkit.families.base import Family, UnknownFamilyError
from glmkit.models.config import GLMConfig

FAMILIES: dict[str, Family] = {family.name: family for family in (
    chatglm6b.FAMILY, glm130b.FAMILY, chatglm2.FAMILY, transformers_glm.GLM, transformers_glm.GLM4)}

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
    return f"config.json describes no GLM family glmkit knows: {found}; glmkit loads {', '.join(FAMILIES)}"
