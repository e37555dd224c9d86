"""Numerical parity with the official ChatGLM2, ChatGLM3 and GLM-4 code, through chatglm.cpp's public vectors
(the official modeling_chatglm.py on a tiny random model: hidden 32, 8 heads, 2 KV groups, ffn 48, 1 layer,
vocab 5; ../shared/testdata/chatglm_cpp/README.md). The weights are written as a THUDM-layout checkpoint and
loaded through glmkit's loader, so the family's mapping is checked too."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_parity import Reader

from glmkit import GLMForCausalLM

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "chatglm_cpp"
HIDDEN, FFN, QKV = 32, 48, 48  # 8 query heads and 2 KV heads of 4 dims: 32 + 2 * 2 * 4 rows
# GLM-4's RMSNorm eps (spec 1.2); ChatGLM2/3's is 1e-5. chatglm.cpp's vectors use each model's own.
EPS = {"glm2": 1e-5, "glm3": 1e-5, "glm4": 1.5625e-07}
SHAPES = [
    ("transformer.embedding.word_embeddings.weight", (5, HIDDEN)),
    ("transformer.encoder.layers.0.input_layernorm.weight", (HIDDEN,)),
    ("transformer.encoder.layers.0.self_attention.query_key_value.weight", (QKV, HIDDEN)),
    ("transformer.encoder.layers.0.self_attention.query_key_value.bias", (QKV,)),
    ("transformer.encoder.layers.0.self_attention.dense.weight", (HIDDEN, HIDDEN)),
    ("transformer.encoder.layers.0.post_attention_layernorm.weight", (HIDDEN,)),
    ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", (2 * FFN, HIDDEN)),
    ("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight", (HIDDEN, FFN)),
    ("transformer.encoder.final_layernorm.weight", (HIDDEN,)),
]


def read_vectors(name: str, prefix_shape=None):
    path = DATA / f"{name}_model.data"
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path} (they live in the shared/ folder beside the repo)")
    r = Reader(path)
    prefix = r.take(np.float16, *prefix_shape).float() if prefix_shape else None
    weights = {n: r.take(np.float32, *shape) for n, shape in SHAPES}
    steps = [(r.take(np.int32, n).long(), r.take(np.float32, n, HIDDEN)) for n in (3, 1, 1)]
    assert r.offset == len(r.buf), "the vector file layout changed"
    return weights, steps, prefix


def thudm_directory(tmp_path: Path, weights: dict, eps: float, **config) -> Path:
    """The official layout by hand: THUDM names and config keys, and the untied output layer (not in the
    vectors, which stop at the final norm)."""
    state = {**weights, "transformer.output_layer.weight": torch.randn(5, HIDDEN),
             "transformer.rotary_pos_emb.inv_freq": torch.ones(1)}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "architectures": ["ChatGLMModel"], "add_bias_linear": False, "add_qkv_bias": True,
        "apply_residual_connection_post_layernorm": False, "ffn_hidden_size": FFN, "hidden_size": HIDDEN,
        "kv_channels": 4, "layernorm_epsilon": eps, "multi_query_attention": True, "multi_query_group_num": 2,
        "num_attention_heads": 8, "num_layers": 1, "padded_vocab_size": 5, "post_layer_norm": True, "rmsnorm": True,
        "seq_length": 16, "torch_dtype": "float32", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
        **config}))
    return tmp_path


@torch.no_grad()
def run_three_steps(model, steps) -> list[torch.Tensor]:
    """Prefill x1 (positions 0..2, causal), then decode x2 and x3 from the KV cache (positions 3, 4)."""
    model.setup_kv_cache(1, 8)
    (x1, _), (x2, _), (x3, _) = steps
    causal = ~torch.ones(3, 3, dtype=torch.bool).tril()
    out = [model.transformer(x1[None], torch.arange(3)[None, None], causal[None, None], cache_position=0)[0]]
    out.append(model.transformer(x2[None], torch.tensor([[[3]]]), None, cache_position=3)[0])
    out.append(model.transformer(x3[None], torch.tensor([[[4]]]), None, cache_position=4)[0])
    return out


@pytest.mark.parametrize("name", ["glm2", "glm3", "glm4"])
def test_matches_official_hidden_states_with_kv_cache(tmp_path, name):
    weights, steps, _ = read_vectors(name)
    model = GLMForCausalLM.from_pretrained(thudm_directory(tmp_path, weights, EPS[name]), progress=False)
    got = run_three_steps(model, steps)
    for out, (_, expected) in zip(got, steps, strict=True):
        torch.testing.assert_close(out, expected, atol=5e-4, rtol=0)
    print(name, "max abs diff", max(float((o - e).abs().max()) for o, (_, e) in zip(got, steps, strict=True)))


def test_positions_and_mask_derived_from_ids_match_official(tmp_path):
    """The causal layout derives positions 0..L-1 and the causal mask from the ids alone."""
    weights, steps, _ = read_vectors("glm3")
    model = GLMForCausalLM.from_pretrained(thudm_directory(tmp_path, weights, 1e-5), progress=False)
    with torch.no_grad():
        out = model(steps[0][0][None])
    torch.testing.assert_close(out.hidden_states[0], steps[0][1], atol=5e-4, rtol=0)


def test_rotary_in_neox_halves_would_break_parity(tmp_path):
    """Guards pitfall 5 of the spec: the adjacent-pair rotation is what the official code computes."""
    weights, steps, _ = read_vectors("glm3")
    model = GLMForCausalLM.from_pretrained(thudm_directory(tmp_path, weights, 1e-5), progress=False)
    qkv = model.transformer.layers[0].attention.query_key_value
    with torch.no_grad():  # swap the order of q and k within each head's rotated pair (= rotating the other way)
        rows = qkv.weight.view(-1, 4)[:40].clone()
        qkv.weight.view(-1, 4)[:40] = rows[:, [1, 0, 2, 3]]
    assert (run_three_steps(model, steps)[2] - steps[2][1]).abs().max() > 1e-3


def test_p_tuning_v2_prefix_matches_official(tmp_path):
    """ChatGLM3's P-Tuning v2: the official prefix keys/values for the 2 KV groups, unrotated, never masked."""
    pre_seq_len, kv_heads, head_dim = 5, 2, 4
    path = DATA / "glm3_ptuning_v2_model.data"
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path}")
    weights, steps, prefix = read_vectors("glm3_ptuning_v2", (2, kv_heads, pre_seq_len, head_dim))
    # The official encoder's output row p is (layer, key/value, kv head, dim) flattened.
    weights["transformer.prefix_encoder.embedding.weight"] = prefix.permute(2, 0, 1, 3).reshape(pre_seq_len, -1)
    model = GLMForCausalLM.from_pretrained(thudm_directory(tmp_path, weights, 1e-5, pre_seq_len=pre_seq_len),
                                           progress=False)
    for got, (_, want) in zip(run_three_steps(model, steps), steps, strict=True):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
