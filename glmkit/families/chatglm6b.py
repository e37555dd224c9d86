"""ChatGLM-6B (THUDM/chatglm-6b): the official layout is glmkit's own, so nothing is renamed.

https://huggingface.co/THUDM/chatglm-6b/blob/main/config.json: model_type "chatglm", 2D positions,
no grouped-query keys (those mark ChatGLM2 and later, which share the model_type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from glmkit.families.base import Family
from glmkit.text.tokenizer import TOKENIZER_FILES, ChatGLMTokenizer

# Keys only the later generations (ChatGLM2, ChatGLM3, GLM-4) write under the same model_type.
NEWER_GENERATION_KEYS = ("multi_query_group_num", "padded_vocab_size")


def is_v1(data: Mapping[str, Any]) -> bool:
    """A ChatGLM-6B-style config: model_type chatglm (or none, as old glmkit directories), no newer keys."""
    return data.get("model_type", "chatglm") == "chatglm" and not any(k in data for k in NEWER_GENERATION_KEYS)


FAMILY = Family(
    name="chatglm-6b",
    summary="ChatGLM-6B: 2D positions, post-norm with DeepNorm's alpha, GELU, tied output layer",
    matches=lambda data: is_v1(data) and data.get("position_encoding_2d", True) is not False,
    position_layout="2d-prefix-lm",
    load_tokenizer=ChatGLMTokenizer.from_pretrained,
    tokenizer_files=TOKENIZER_FILES,
    ignored=(".rotary_emb.inv_freq",),  # the official checkpoint stores it; glmkit computes it
)
