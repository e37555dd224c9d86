"""Tiny random checkpoints in the official ChatGLM2/ChatGLM3/GLM-4 layouts, written by hand from the spec
(../shared/spec/chatglm2-chatglm3-glm4.md sections 1.3 and 2.2), independently of glmkit's name mapping."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# A tiny GLM-4-shaped model: 4 query heads of 16 dims, 2 KV heads (GQA), SwiGLU.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 64, 4, 2, 16, 96, 2, 128
Q_ROWS, KV_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM


def thudm_config(**overrides) -> dict:
    """THUDM's config.json keys (spec 1.1), as chatglm3-6b / glm-4-9b-chat write them."""
    config = {
        "_name_or_path": "THUDM/tiny-chatglm", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "ffn_hidden_size": FFN, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "hidden_size": HIDDEN, "kv_channels": HEAD_DIM, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
        "multi_query_group_num": KV_HEADS, "num_attention_heads": HEADS, "num_layers": LAYERS, "original_rope": True,
        "padded_vocab_size": VOCAB, "post_layer_norm": True, "rmsnorm": True, "seq_length": 256,
        "use_cache": True, "torch_dtype": "float16", "transformers_version": "4.30.2", "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0,
    }
    return {**config, **overrides}


def hf_config(model_type: str = "glm", **overrides) -> dict:
    """transformers' GlmConfig / Glm4Config keys (spec 2.1)."""
    config = {
        "architectures": ["GlmForCausalLM" if model_type == "glm" else "Glm4ForCausalLM"], "model_type": model_type,
        "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": [2, 5, 7], "head_dim": HEAD_DIM,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": 256, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "pad_token_id": 2, "partial_rotary_factor": 0.5, "rms_norm_eps": 1.5625e-07,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.57.6", "use_cache": True, "vocab_size": VOCAB,
    }
    return {**config, **overrides}


def _rand(*shape, generator, scale=0.15):
    return torch.randn(*shape, generator=generator) * scale


def _norm(generator):
    return 1.0 + _rand(HIDDEN, generator=generator, scale=0.1)


def thudm_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The THUDM checkpoint's tensors (spec 1.3), including the rotary buffer the official code stores."""
    g = torch.Generator().manual_seed(seed)
    state = {"transformer.embedding.word_embeddings.weight": _rand(VOCAB, HIDDEN, generator=g, scale=1.0),
             "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HEAD_DIM // 2, 2).float()
                                                                   / (HEAD_DIM // 2))}
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}."
        state.update({
            p + "input_layernorm.weight": _norm(g),
            p + "self_attention.query_key_value.weight": _rand(Q_ROWS + 2 * KV_ROWS, HIDDEN, generator=g),
            p + "self_attention.query_key_value.bias": _rand(Q_ROWS + 2 * KV_ROWS, generator=g),
            p + "self_attention.dense.weight": _rand(HIDDEN, Q_ROWS, generator=g),
            p + "post_attention_layernorm.weight": _norm(g),
            p + "mlp.dense_h_to_4h.weight": _rand(2 * FFN, HIDDEN, generator=g),
            p + "mlp.dense_4h_to_h.weight": _rand(HIDDEN, FFN, generator=g),
        })
    state["transformer.encoder.final_layernorm.weight"] = _norm(g)
    state["transformer.output_layer.weight"] = _rand(VOCAB, HIDDEN, generator=g)
    return state


def hf_state(sandwich: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers' GlmForCausalLM (and, with `sandwich`, Glm4ForCausalLM) tensors (spec 2.2, 2.4)."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": _rand(VOCAB, HIDDEN, generator=g, scale=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": _norm(g),
            p + "self_attn.q_proj.weight": _rand(Q_ROWS, HIDDEN, generator=g),
            p + "self_attn.q_proj.bias": _rand(Q_ROWS, generator=g),
            p + "self_attn.k_proj.weight": _rand(KV_ROWS, HIDDEN, generator=g),
            p + "self_attn.k_proj.bias": _rand(KV_ROWS, generator=g),
            p + "self_attn.v_proj.weight": _rand(KV_ROWS, HIDDEN, generator=g),
            p + "self_attn.v_proj.bias": _rand(KV_ROWS, generator=g),
            p + "self_attn.o_proj.weight": _rand(HIDDEN, Q_ROWS, generator=g),
            p + "post_attention_layernorm.weight": _norm(g),
            p + "mlp.gate_up_proj.weight": _rand(2 * FFN, HIDDEN, generator=g),
            p + "mlp.down_proj.weight": _rand(HIDDEN, FFN, generator=g),
        })
        if sandwich:
            state[p + "post_self_attn_layernorm.weight"] = _norm(g)
            state[p + "post_mlp_layernorm.weight"] = _norm(g)
    state["model.norm.weight"] = _norm(g)
    state["lm_head.weight"] = _rand(VOCAB, HIDDEN, generator=g)
    return state


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: dict, *, safetensors: bool = True,
                     shards: int = 1, dtype: torch.dtype = torch.float32) -> Path:
    """Write `state` as the official repositories do: one file or `shards` shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    ext, stem = ("safetensors", "model") if safetensors else ("bin", "pytorch_model")
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"{stem}.{ext}" if shards == 1 else f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {n: state[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(directory / file), metadata={"format": "pt"}) if safetensors else torch.save(
            part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (directory / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
