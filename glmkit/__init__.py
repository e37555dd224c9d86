"""glmkit: run, chat with, serve and fine-tune the GLM model family (ChatGLM-6B, GLM-130B) in PyTorch."""

from glmkit.api import GLMForCausalLM, load
from glmkit.config import GLMConfig
from glmkit.generation import SamplingParams
from glmkit.tokenizer import ChatGLMTokenizer

__all__ = ["ChatGLMTokenizer", "GLMConfig", "GLMForCausalLM", "SamplingParams", "load"]
__version__ = "0.1.0"
