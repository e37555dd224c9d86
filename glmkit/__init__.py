"""glmkit: run, chat with, serve and fine-tune the GLM model family (ChatGLM-6B, GLM-130B) in PyTorch.

The names below are imported on first use (PEP 562), so `import glmkit` (and tools that only need the
config or the sampling parameters) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmkit.generation.sampling import SamplingParams
    from glmkit.models.config import GLMConfig
    from glmkit.pretrained import GLMForCausalLM, load
    from glmkit.text.tokenizer import ChatGLMTokenizer

_EXPORTS = {
    "ChatGLMTokenizer": "glmkit.text.tokenizer",
    "GLMConfig": "glmkit.models.config",
    "GLMForCausalLM": "glmkit.pretrained",
    "SamplingParams": "glmkit.generation.sampling",
    "load": "glmkit.pretrained",
}

__all__ = ["ChatGLMTokenizer", "GLMConfig", "GLMForCausalLM", "SamplingParams", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
