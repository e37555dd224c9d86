"""glmkit's internal parameter names: the one place that spells them out.

A family's checkpoint names are mapped onto these when a model is loaded and back when it is saved
(glmkit.families), so quantization, tensor parallelism, LoRA and resharding read these names only.
They are ChatGLM-6B's official names, so its checkpoints load as a plain state-dict copy.

    transformer.word_embeddings                      EMBEDDING
    transformer.layers.N.<BLOCK_LINEARS path>        the four linears of block N
    transformer.layers.N.*layernorm, final_layernorm NORM
    lm_head                                          OUTPUT (tied to the embedding unless the config says not)
"""

from __future__ import annotations

from dataclasses import dataclass

EMBEDDING = "transformer.word_embeddings"
OUTPUT = "lm_head"
BLOCKS = "transformer.layers"
NORM = "layernorm"  # the suffix every layer norm's name ends with


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a block, with how tensor parallelism splits it (Megatron style)."""

    path: str  # inside a block: "attention.query_key_value"
    split: str  # "column": output rows are split; "row": input columns are split (and the bias is kept once)
    units: str  # the config count that must divide evenly across ranks along the split

    @property
    def attr(self) -> str:
        """The attribute name on its parent module."""
        return self.path.rpartition(".")[2]


QKV = BlockLinear("attention.query_key_value", "column", "num_attention_heads")  # per head: [q_h | k_h | v_h]
ATTENTION_OUT = BlockLinear("attention.dense", "row", "num_attention_heads")
MLP_UP = BlockLinear("mlp.dense_h_to_4h", "column", "inner_hidden_size")  # GeGLU: [x1; x2]
MLP_DOWN = BlockLinear("mlp.dense_4h_to_h", "row", "inner_hidden_size")
BLOCK_LINEARS = (QKV, ATTENTION_OUT, MLP_UP, MLP_DOWN)


def in_block(name: str) -> bool:
    """Whether a parameter or module name (full, or relative to the transformer) lies inside a block."""
    return f".{BLOCKS.rpartition('.')[2]}." in f".{name}."


def block_linear(name: str) -> BlockLinear | None:
    """The block linear a parameter name belongs to (`...query_key_value.weight` -> QKV), if any."""
    module = name.rpartition(".")[0]
    return next((linear for linear in BLOCK_LINEARS if module.endswith(linear.path)), None)
