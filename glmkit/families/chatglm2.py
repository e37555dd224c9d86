"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B in THUDM's remote-code layout (`ChatGLMModel`, model_type "chatglm").

One architecture (spec section 1): RMSNorm, pre-norm, grouped-query attention with the fused QKV blockwise,
bias on QKV only, SwiGLU, rotary on the first half of each head in adjacent pairs, causal, untied output.
config.json keys are THUDM's; the ones glmkit reads under other names are `padded_vocab_size` (vocab_size),
`ffn_hidden_size` (inner_hidden_size), `seq_length` (max_sequence_length) and `rope_ratio`: rotary_base =
10000 * rope_ratio for ChatGLM3 (-32k, -128k) and GLM-4, but rotary_position_interpolation = rope_ratio (positions
divided by it, base 10000) for ChatGLM2 (ChatGLM2-6B-32K's remote code; spec 1.1, pitfall 6). Everything else
THUDM writes is kept as it was and written back.

Told apart from ChatGLM-6B (same model_type) by the keys only the later generations write. Which of the three
generations a directory holds is told by its tokenizer files (glmkit.text.auto.AutoTokenizer), and the chat
format travels with the tokenizer (glmkit.text.formats); `variant` reads the vocabulary's special ids from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmkit.families.base import Family
from glmkit.families.chatglm6b import NEWER_GENERATION_KEYS
from glmkit.models.config import ConfigError, GLMConfig
from glmkit.text.auto import AutoTokenizer

ROPE_BASE = 10000.0
GLM4_VOCAB = 151552  # padded_vocab_size of every GLM-4-9B release (ChatGLM2/3: 65024)

# The ids that shape GLM prompts ([MASK], [gMASK], sop), per vocabulary (spec 3.1, 3.3). A causal model's
# positions do not depend on them; they are kept for the tokenizer-free paths that name them.
SPECIAL_IDS = {
    "sentencepiece": dict(mask_token_id=64789, gmask_token_id=64790, bos_token_id=64792),
    "glm-4": dict(mask_token_id=151330, gmask_token_id=151331, bos_token_id=151333),
}

# THUDM keys glmkit reads under its own names: THUDM key -> GLMConfig field.
RENAMED_KEYS = {"padded_vocab_size": "vocab_size", "ffn_hidden_size": "inner_hidden_size",
                "seq_length": "max_sequence_length"}
# THUDM keys that are GLMConfig fields under the same name (written back from the config).
SAME_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "multi_query_group_num",
             "layernorm_epsilon", "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm",
             "add_bias_linear", "add_qkv_bias", "tie_word_embeddings", "pad_token_id", "torch_dtype")
# glmkit's own keys, written only when set (THUDM's code reads quantization_bit and pre_seq_len too).
GLMKIT_KEYS = {"quantization_bit": 0, "quantization_group_size": 0, "quantization_embedding_bit": 0,
               "pre_seq_len": None, "prefix_projection": False}


def is_later_generation(data: Mapping[str, Any]) -> bool:
    return data.get("model_type", "chatglm") == "chatglm" and any(k in data for k in NEWER_GENERATION_KEYS)


def variant(data: Mapping[str, Any], directory: str | Path | None = None) -> str:
    """"chatglm2", "chatglm3" or "glm-4" for a THUDM config.json (and the directory it came from).

    GLM-4 is told by its vocabulary (padded_vocab_size 151552). ChatGLM2 and ChatGLM3 share the architecture,
    the vocabulary and the SentencePiece file, so config.json alone cannot tell them apart: the tokenizer files
    do (ChatGLM3's tokenizer has the role tokens `<|user|>`, `<|observation|>`), then the model's name."""
    if data.get("padded_vocab_size", data.get("vocab_size")) == GLM4_VOCAB:
        return "glm-4"
    if directory is not None:
        for name in ("tokenization_chatglm.py", "tokenizer_config.json", "tokenizer.json"):
            path = Path(directory) / name
            if path.is_file() and "<|observation|>" in path.read_text(encoding="utf-8", errors="replace"):
                return "chatglm3"
    return "chatglm3" if "chatglm3" in str(data.get("_name_or_path", "")).lower() else "chatglm2"


def read_config(data: Mapping[str, Any], directory: str | Path | None = None) -> dict[str, Any]:
    if data.get("multi_query_attention", True) is False:
        raise ConfigError("multi_query_attention false (full multi-head attention) is in no ChatGLM2/3 or GLM-4 "
                          "release; glmkit loads the grouped-query layout only")
    if data.get("fp32_residual_connection"):
        raise ConfigError("fp32_residual_connection true is not supported (the official code feeds fp32 into "
                          "half-precision layers)")
    missing = [k for k in ("padded_vocab_size", "ffn_hidden_size", "kv_channels", "multi_query_group_num")
               if k not in data]
    if missing:
        raise ConfigError(f"a ChatGLM2/ChatGLM3/GLM-4 config.json needs {', '.join(missing)}")
    # THUDM keys that are not GLMConfig fields stay in `extra` (and are written back as they were).
    internal = dict(data)
    internal.pop("vocab_size", None)  # the configuration class sets it equal to padded_vocab_size
    internal.update({field: data[key] for key, field in RENAMED_KEYS.items() if key in data})
    eos = data.get("eos_token_id", 2)
    eos = list(eos) if isinstance(eos, list | tuple) else [eos]
    generation = variant(data, directory)
    vocabulary = "glm-4" if generation == "glm-4" else "sentencepiece"
    ratio = float(data.get("rope_ratio", 1))
    # ChatGLM2-6B-32K divides the positions by rope_ratio; ChatGLM3-32k/128k and GLM-4 multiply the base by it.
    rope = (dict(rotary_base=ROPE_BASE, rotary_position_interpolation=ratio) if generation == "chatglm2"
            else dict(rotary_base=ROPE_BASE * ratio))
    internal.update(
        SPECIAL_IDS[vocabulary], **rope, eos_token_id=eos[0], additional_eos_token_ids=eos[1:],
        pad_token_id=data.get("pad_token_id", 0),
        # The architecture's fixed choices (spec 1.4-1.6).
        position_encoding_2d=False, causal=True, rotary_style="interleaved", partial_rotary_factor=0.5,
        mlp_type="swiglu", residual_alpha=1.0, tie_word_embeddings=data.get("tie_word_embeddings", False),
        rmsnorm=data.get("rmsnorm", True), apply_residual_connection_post_layernorm=data.get(
            "apply_residual_connection_post_layernorm", False),
        post_layer_norm=data.get("post_layer_norm", True), add_bias_linear=data.get("add_bias_linear", False),
        add_qkv_bias=data.get("add_qkv_bias", False),
    )
    return internal


def write_config(config: GLMConfig) -> dict[str, Any]:
    data = {**config.extra, "model_type": config.extra.get("model_type", "chatglm")}
    data.update({key: getattr(config, field) for key, field in RENAMED_KEYS.items()})
    data.update({key: getattr(config, key) for key in SAME_KEYS})
    data["multi_query_attention"] = True
    if config.rotary_position_interpolation != 1 and config.rotary_base != ROPE_BASE:
        raise ConfigError(f"a THUDM config.json has one rope_ratio: it cannot hold both rotary_base "
                          f"{config.rotary_base} and rotary_position_interpolation "
                          f"{config.rotary_position_interpolation}")
    if "rope_ratio" in data or config.rotary_base != ROPE_BASE or config.rotary_position_interpolation != 1:
        ratio = config.rotary_base / ROPE_BASE * config.rotary_position_interpolation
        data["rope_ratio"] = int(ratio) if ratio == int(ratio) else ratio
    eos = [config.eos_token_id, *config.additional_eos_token_ids]
    data["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    data.update({k: getattr(config, k) for k, default in GLMKIT_KEYS.items() if getattr(config, k) != default})
    return data


FAMILY = Family(
    name="chatglm2",
    summary="ChatGLM2/ChatGLM3/GLM-4-9B (THUDM layout): RMSNorm, pre-norm, GQA, SwiGLU, half-head pair rotary, "
            "causal, untied output layer",
    matches=is_later_generation,
    position_layout="causal",
    load_tokenizer=AutoTokenizer.from_pretrained,  # ChatGLM2, ChatGLM3 or GLM-4 by the files the repo ships
    tokenizer_files=("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"),
    renames=(("transformer.embedding.word_embeddings.", "transformer.word_embeddings."),
             ("transformer.encoder.layers.", "transformer.layers."),
             ("transformer.encoder.final_layernorm.", "transformer.final_layernorm."),
             ("transformer.output_layer.", "lm_head.")),
    block_renames=(("self_attention.", "attention."),),
    ignored=("transformer.rotary_pos_emb.inv_freq",),  # glmkit computes the rotary table
    read_config=read_config,
    write_config=write_config,
    renamed_keys=tuple(RENAMED_KEYS.items()),
)
