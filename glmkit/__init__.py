"""glmkit: run, chat with, serve and fine-tune the GLM model family (ChatGLM-6B, GLM-130B, ChatGLM2/3,
GLM-4) in PyTorch.

The names below are imported on first use (PEP 562), so `import glmkit` (and tools that only need the
config or the sampling parameters) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmkit.lazy import lazy_exports

if TYPE_CHECKING:
    from glmkit.generation.sampling import SamplingParams
    from glmkit.models.config import GLMConfig
    from glmkit.pretrained import GLMForCausalLM, load
    from glmkit.text.auto import AutoTokenizer
    from glmkit.text.tokenizer import ChatGLMTokenizer

_EXPORTS = {
    "AutoTokenizer": "glmkit.text.auto",
    "ChatGLMTokenizer": "glmkit.text.tokenizer",
    "GLMConfig": "glmkit.models.config",
    "GLMForCausalLM": "glmkit.pretrained",
    "SamplingParams": "glmkit.generation.sampling",
    "load": "glmkit.pretrained",
}

__all__ = ["AutoTokenizer", "ChatGLMTokenizer", "GLMConfig", "GLMForCausalLM", "SamplingParams", "load"]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
