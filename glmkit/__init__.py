"""glmkit: run, chat with, serve and fine-tune the GLM model family (ChatGLM-6B, GLM-130B) in PyTorch."""

from glmkit.generation.generate import SamplingParams
from glmkit.models.config import GLMConfig
from glmkit.pretrained import GLMForCausalLM, load
from glmkit.text.tokenizer import ChatGLMTokenizer

__all__ = ["ChatGLMTokenizer", "GLMConfig", "GLMForCausalLM", "SamplingParams", "load"]
__version__ = "0.1.0"
