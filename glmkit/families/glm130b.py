"""GLM-130B (THUDM/GLM-130B): ChatGLM-6B's model with 1D positions, GeGLU and an fp16 rotary table.

Its official checkpoints are SwissArmyTransformer's (glmkit.checkpoints.sat converts them) and carry no
config; glmkit writes a ChatGLM-style config.json with `position_encoding_2d: false`, which is how the
family is told apart from ChatGLM-6B. It has no chat format of its own: glmkit chats with ChatGLM-6B's.
"""

from __future__ import annotations

from glmkit.families.base import Family
from glmkit.families.chatglm6b import is_v1
from glmkit.text.tokenizer import TOKENIZER_FILES, ChatGLMTokenizer

FAMILY = Family(
    name="glm-130b",
    summary="GLM-130B: 1D positions, GeGLU, DeepNorm alpha by depth, fp16 rotary table",
    matches=lambda data: is_v1(data) and data.get("position_encoding_2d", True) is False,
    position_layout="1d-prefix-lm",
    load_tokenizer=ChatGLMTokenizer.from_pretrained,
    tokenizer_files=TOKENIZER_FILES,
    # SAT stores the rotary inv_freq (glmkit computes it) and a learned position table GLM-130B never uses.
    ignored=(".inv_freq", "transformer.position_embeddings.weight"),
)
