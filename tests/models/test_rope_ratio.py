"""`rope_ratio` means two things (spec 1.1, 1.5, pitfall 6): ChatGLM2-6B-32K's remote code divides the positions by
it (linear position interpolation, base 10000); ChatGLM3-32k/128k and GLM-4 multiply the base by it. The expected
logits come from a forward pass written here from the spec (sections 1.3-1.6), rotary included, on the THUDM
checkpoint's own tensors: nothing of glmkit's model is used for them."""

import json
import math

import pytest
import torch

from glmkit import GLMForCausalLM

from layouts import HEAD_DIM, HEADS, KV_HEADS, LAYERS, thudm_config, thudm_state, write_checkpoint

IDS = torch.tensor([[1, 5, 9, 100, 3, 77, 12, 40, 41, 7, 64, 2]])
ROLE_TOKENS = 'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]'


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x, positions, base):
    """Spec 1.5: the first half of each head rotates in adjacent pairs (x[2i], x[2i+1]) by angle p * theta_i,
    theta_i = base^(-2i/(d/2)); the second half passes through. x [S, H, d], positions [S] (float)."""
    d = x.shape[-1] // 2
    out = x.clone()
    for i in range(d // 2):
        angle = positions * base ** (-2 * i / d)
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i], out[..., 2 * i + 1] = a * cos - b * sin, b * cos + a * sin
    return out


def reference_logits(state, ids, positions, base):
    """The THUDM ChatGLMModel on one sequence: pre-norm RMSNorm blocks, blockwise [Q | K | V] with bias, GQA,
    causal softmax attention, SwiGLU, final norm, untied output layer."""
    h = state["transformer.embedding.word_embeddings.weight"][ids]
    seq = len(ids)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for n in range(LAYERS):
        p = f"transformer.encoder.layers.{n}."
        x = rms_norm(h, state[p + "input_layernorm.weight"])
        qkv = x @ state[p + "self_attention.query_key_value.weight"].T + state[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = rotary(q.view(seq, HEADS, HEAD_DIM), positions, base)
        k = rotary(k.view(seq, KV_HEADS, HEAD_DIM), positions, base)
        v = v.view(seq, KV_HEADS, HEAD_DIM)
        heads = []
        for head in range(HEADS):
            group = head // (HEADS // KV_HEADS)
            scores = (q[:, head] @ k[:, group].T) / math.sqrt(HEAD_DIM)
            heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, group])
        h = h + torch.cat(heads, dim=-1) @ state[p + "self_attention.dense.weight"].T
        x = rms_norm(h, state[p + "post_attention_layernorm.weight"])
        x1, x2 = (x @ state[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(x1) * x2) @ state[p + "mlp.dense_4h_to_h.weight"].T
    h = rms_norm(h, state["transformer.encoder.final_layernorm.weight"])
    return h @ state["transformer.output_layer.weight"].T


def logits(directory):
    model = GLMForCausalLM.from_pretrained(directory, progress=False, dtype="float32")
    with torch.no_grad():
        return model, model(IDS).logits[0]


def test_chatglm2_rope_ratio_divides_the_positions(tmp_path):
    """ChatGLM2-6B-32K: p / rope_ratio, base 10000; config.json goes back as it was (rope_ratio 4, no glmkit key)."""
    state, config = thudm_state(), thudm_config(_name_or_path="THUDM/chatglm2-6b-32k", rope_ratio=4)
    model, got = logits(write_checkpoint(tmp_path / "a", state, config))
    assert (model.config.rotary_base, model.config.rotary_position_interpolation) == (10000, 4)
    positions = torch.arange(IDS.shape[1], dtype=torch.float32)
    expected = reference_logits(state, IDS[0], positions / 4, 10000.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the check can tell: neither plain positions nor a scaled base give these logits
    assert not torch.allclose(got, reference_logits(state, IDS[0], positions, 10000.0), atol=1e-2)
    assert not torch.allclose(got, reference_logits(state, IDS[0], positions, 40000.0), atol=1e-2)
    saved = model.save_pretrained(tmp_path / "b")
    assert json.loads((saved / "config.json").read_text()) == {**config, "torch_dtype": "float32"}
    again, reloaded = logits(saved)
    assert again.config.rotary_position_interpolation == 4
    torch.testing.assert_close(reloaded, got, rtol=0, atol=0)


@pytest.mark.parametrize("told_by", ["name", "tokenizer files"])
def test_chatglm3_rope_ratio_scales_the_base(tmp_path, told_by):
    """ChatGLM3-6B-32k/128k: base 10000 * rope_ratio, positions as they are."""
    state = thudm_state()
    config = thudm_config(rope_ratio=4, **({"_name_or_path": "THUDM/chatglm3-6b-32k"} if told_by == "name" else {}))
    directory = write_checkpoint(tmp_path / "a", state, config)
    if told_by == "tokenizer files":
        (directory / "tokenization_chatglm.py").write_text(ROLE_TOKENS)
    model, got = logits(directory)
    assert (model.config.rotary_base, model.config.rotary_position_interpolation) == (40000, 1)
    positions = torch.arange(IDS.shape[1], dtype=torch.float32)
    torch.testing.assert_close(got, reference_logits(state, IDS[0], positions, 40000.0), rtol=1e-4, atol=1e-4)
    saved = model.save_pretrained(tmp_path / "b")
    assert json.loads((saved / "config.json").read_text()) == {**config, "torch_dtype": "float32"}


def test_v1_configs_gain_no_interpolation_key():
    from glmkit.models.config import GLMConfig, preset

    for config in (GLMConfig(), preset("glm-130b")):
        assert "rotary_position_interpolation" not in config.to_dict()
