"""GLM-4 in transformers' own layouts: `GlmForCausalLM` (model_type "glm": glm-4-9b-hf, glm-4-9b-chat-hf) and
`Glm4ForCausalLM` ("glm4": GLM-4-0414, GLM-Z1), spec section 2.

The architecture is ChatGLM2's (glmkit.families.chatglm2); Glm4 adds an RMSNorm on each sublayer's output
(`post_self_attn_layernorm`, `post_mlp_layernorm`). transformers stores q, k and v apart (glmkit fuses them
into query_key_value, rows [q | k | v], and splits them again when saving) and keeps `gate_up_proj` fused in
THUDM's order (gate first). config.json keys are transformers' (GlmConfig / Glm4Config), mapped both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmkit.families.base import Family, Fusion
from glmkit.families.chatglm2 import GLMKIT_KEYS, SPECIAL_IDS
from glmkit.models.config import ConfigError, GLMConfig
from glmkit.text.auto import AutoTokenizer

# transformers key -> GLMConfig field, where the names differ.
RENAMED_KEYS = {"intermediate_size": "inner_hidden_size", "num_hidden_layers": "num_layers",
                "num_key_value_heads": "multi_query_group_num", "head_dim": "kv_channels",
                "max_position_embeddings": "max_sequence_length", "rms_norm_eps": "layernorm_epsilon",
                "rope_theta": "rotary_base", "attention_bias": "add_qkv_bias"}
SAME_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "partial_rotary_factor", "tie_word_embeddings",
             "pad_token_id", "bos_token_id", "torch_dtype")
# GlmConfig's defaults (glm-4-9b-chat's shapes), for keys a config.json may leave out.
DEFAULTS = {"vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 131072,
            "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "attention_bias": True, "partial_rotary_factor": 0.5,
            "tie_word_embeddings": False, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338],
            "bos_token_id": None}


def _reader(model_type: str, sandwich: bool):
    def read_config(data: Mapping[str, Any], directory: Path | None = None) -> dict[str, Any]:
        if data.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"a {model_type} config with hidden_act {data['hidden_act']!r}: glmkit runs SwiGLU "
                              "(silu) only")
        if data.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {data['rope_scaling']!r} is not supported yet: remove it from "
                              "config.json to run within the native context (max_position_embeddings)")
        values = {**DEFAULTS, **data}
        internal = {k: v for k, v in data.items() if k not in RENAMED_KEYS and k != "dtype"}
        if "dtype" in data and "torch_dtype" not in data:  # transformers >= 4.56 writes `dtype`
            internal["torch_dtype"] = data["dtype"]
        internal.update({field: values[key] for key, field in RENAMED_KEYS.items()})
        internal.update({key: values[key] for key in SAME_KEYS if key != "torch_dtype"})
        eos = values["eos_token_id"]
        eos = list(eos) if isinstance(eos, list | tuple) else [eos]
        internal.update(
            {k: v for k, v in SPECIAL_IDS["glm-4"].items() if k != "bos_token_id"},
            eos_token_id=eos[0], additional_eos_token_ids=eos[1:], model_type=model_type,
            position_encoding_2d=False, causal=True, rotary_style="interleaved", mlp_type="swiglu",
            residual_alpha=1.0, rmsnorm=True, apply_residual_connection_post_layernorm=False,
            post_layer_norm=True, add_bias_linear=False, sandwich_norm=sandwich,
        )
        return internal
    return read_config


def _writer(model_type: str):
    def write_config(config: GLMConfig) -> dict[str, Any]:
        data = {**config.extra, "model_type": model_type}
        data.update({key: getattr(config, field) for key, field in RENAMED_KEYS.items()})
        data.update({key: getattr(config, key) for key in SAME_KEYS})
        if config.bos_token_id is None:  # GlmConfig's default: no bos
            del data["bos_token_id"]
        eos = [config.eos_token_id, *config.additional_eos_token_ids]
        data["eos_token_id"] = eos if len(eos) > 1 else eos[0]
        data.update({k: getattr(config, k) for k, default in GLMKIT_KEYS.items() if getattr(config, k) != default})
        return data
    return write_config


def _qkv_rows(config: GLMConfig) -> tuple[int, int, int]:
    kv = config.kv_heads * config.head_dim
    return config.num_attention_heads * config.head_dim, kv, kv


QKV = Fusion("attention.query_key_value", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _qkv_rows)
RENAMES = (("model.embed_tokens.", "transformer.word_embeddings."), ("model.layers.", "transformer.layers."),
           ("model.norm.", "transformer.final_layernorm."))
BLOCK_RENAMES = (("self_attn.o_proj.", "attention.dense."), ("mlp.gate_up_proj.", "mlp.dense_h_to_4h."),
                 ("mlp.down_proj.", "mlp.dense_4h_to_h."))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _family(name: str, summary: str, sandwich: bool) -> Family:
    return Family(
        name=name, summary=summary,
        matches=lambda data: data.get("model_type") == name,
        position_layout="causal",
        load_tokenizer=AutoTokenizer.from_pretrained,  # ChatGLM2, ChatGLM3 or GLM-4 by the files the repo ships
        tokenizer_files=TOKENIZER_FILES,
        renames=RENAMES, block_renames=BLOCK_RENAMES, fusions=(QKV,),
        read_config=_reader(name, sandwich), write_config=_writer(name), renamed_keys=tuple(RENAMED_KEYS.items()),
    )


GLM = _family("glm", "GLM-4-9B in transformers' GlmForCausalLM layout (split q/k/v, fused gate_up_proj)", False)
GLM4 = _family("glm4", "GLM-4-0414 / GLM-Z1 (transformers' Glm4ForCausalLM): GlmForCausalLM plus sandwich norms "
               "around each sublayer", True)
