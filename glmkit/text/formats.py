"""Which chat format a tokenizer's model speaks: the format travels with the tokenizer, as Hugging Face
repositories keep their chat template beside the vocabulary (ChatGLM2 and ChatGLM3 share one architecture
and one config.json; only their tokenizers tell them apart)."""

from __future__ import annotations

from glmkit.text.chat_format import CHATGLM2, CHATGLM_6B, ChatFormat
from glmkit.text.chatglm3_format import CHATGLM3
from glmkit.text.chatglm3_tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmkit.text.fast_tokenizer import GLMFastTokenizer
from glmkit.text.glm4_format import GLM4
from glmkit.text.glm4_tokenizer import GLM4Tokenizer
from glmkit.text.protocol import Tokenizer

# Most specific class first (ChatGLM3Tokenizer is a ChatGLM2Tokenizer with role tokens).
FORMATS: tuple[tuple[type, ChatFormat], ...] = (
    (ChatGLM3Tokenizer, CHATGLM3),
    (ChatGLM2Tokenizer, CHATGLM2),
    (GLM4Tokenizer, GLM4),
    (GLMFastTokenizer, GLM4),  # the -hf and 0414 repositories: GLM-4's roles, rendered by their own template
)


def chat_format_for(tokenizer: Tokenizer) -> ChatFormat:
    """The format of the model this tokenizer belongs to; ChatGLM-6B's (and GLM-130B's) by default."""
    return next((fmt for cls, fmt in FORMATS if isinstance(tokenizer, cls)), CHATGLM_6B)
