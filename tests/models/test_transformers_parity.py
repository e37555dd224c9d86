"""Numerical parity with transformers' GlmForCausalLM and Glm4ForCausalLM (pinned in the dev extra) on tiny
random models built here: saved by transformers itself, loaded by glmkit, fp32 logits within 1e-4 for the
prompt and for cached decoding, and the same greedy tokens."""

import pytest
import torch

from glmkit import GLMForCausalLM

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_bias=True,
             pad_token_id=0, eos_token_id=[1, 2], bos_token_id=None)
CLASSES = {
    "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, dict(rms_norm_eps=1.5625e-07, rope_theta=5e6)),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM, dict(rms_norm_eps=1e-5, rope_theta=10000.0)),
}
PROMPT = [[3, 17, 42, 5, 88, 61, 9, 30, 71, 12]]


@pytest.fixture(params=sorted(CLASSES))
def pair(request, tmp_path):
    config_class, model_class, extra = CLASSES[request.param]
    torch.manual_seed(0)
    config = config_class(**SIZES, **extra, attn_implementation="eager")
    reference = model_class(config).eval()
    with torch.no_grad():  # larger than the default init, so the logits are decisive
        for name, p in reference.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("layernorm.weight") or "norm" in name
                    else 0.15 * torch.randn_like(p))
    reference.save_pretrained(tmp_path)
    return request.param, reference, GLMForCausalLM.from_pretrained(tmp_path, progress=False, dtype="float32")


@torch.no_grad()
def test_prefill_and_cached_decode_logits_match(pair):
    name, reference, model = pair
    ids = torch.tensor(PROMPT)
    expected = reference(ids).logits
    got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Prefill the first 7 tokens, then decode the last 3 one by one from glmkit's KV cache.
    causal = ~torch.ones(7, 7, dtype=torch.bool).tril()
    model.setup_kv_cache(1, 16)
    steps = [model(ids[:, :7], torch.arange(7)[None, None], causal[None, None], cache_position=0).logits]
    for t in range(7, ids.shape[1]):
        steps.append(model(ids[:, t:t + 1], torch.tensor([[[t]]]), None, cache_position=t).logits)
    model.clear_kv_cache()
    diff = (torch.cat(steps, dim=1) - expected).abs().max()
    print(f"{name}: max abs logit diff {float((got - expected).abs().max()):.2e} (full), {float(diff):.2e} (cached)")
    assert diff < 1e-4


@torch.no_grad()
def test_greedy_generation_is_identical(pair):
    _, reference, model = pair
    ids = torch.tensor(PROMPT)
    # Both ban the config's eos ids [1, 2] for 8 tokens (the tiny random model would pick one at once).
    expected = reference.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert got.shape == (1, len(PROMPT[0]) + 8) and got.tolist() == expected.tolist()
