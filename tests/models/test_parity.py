"""Numerical parity with the official ChatGLM-6B code, through chatglm.cpp's public test vectors.

The vectors were produced by running the official modeling_chatglm.py on a tiny random model
(hidden 32, 8 heads, 1 layer, vocab 5); see ../shared/testdata/chatglm_cpp/README.md."""

from pathlib import Path

import numpy as np
import pytest
import torch

from glmkit.models.config import GLMConfig
from glmkit.models.glm import GLM

DATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "chatglm_cpp" / "glm_model.data"
HIDDEN, INNER = 32, 128


class Reader:
    def __init__(self, path: Path) -> None:
        self.buf, self.offset = path.read_bytes(), 0

    def take(self, dtype, *shape) -> torch.Tensor:
        count = int(np.prod(shape))
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset).reshape(shape)
        self.offset += arr.nbytes
        return torch.from_numpy(arr.copy())


def load_vectors():
    if not DATA.exists():
        pytest.skip(f"reference vectors not found at {DATA} (they live in the shared/ folder beside the repo)")
    return _parse(Reader(DATA))


def _parse(r: Reader):
    f32 = np.float32
    names = [
        ("transformer.word_embeddings.weight", (5, HIDDEN)),
        ("transformer.layers.0.input_layernorm.weight", (HIDDEN,)),
        ("transformer.layers.0.input_layernorm.bias", (HIDDEN,)),
        ("transformer.layers.0.attention.query_key_value.weight", (3 * HIDDEN, HIDDEN)),
        ("transformer.layers.0.attention.query_key_value.bias", (3 * HIDDEN,)),
        ("transformer.layers.0.attention.dense.weight", (HIDDEN, HIDDEN)),
        ("transformer.layers.0.attention.dense.bias", (HIDDEN,)),
        ("transformer.layers.0.post_attention_layernorm.weight", (HIDDEN,)),
        ("transformer.layers.0.post_attention_layernorm.bias", (HIDDEN,)),
        ("transformer.layers.0.mlp.dense_h_to_4h.weight", (INNER, HIDDEN)),
        ("transformer.layers.0.mlp.dense_h_to_4h.bias", (INNER,)),
        ("transformer.layers.0.mlp.dense_4h_to_h.weight", (HIDDEN, INNER)),
        ("transformer.layers.0.mlp.dense_4h_to_h.bias", (HIDDEN,)),
        ("transformer.final_layernorm.weight", (HIDDEN,)),
        ("transformer.final_layernorm.bias", (HIDDEN,)),
    ]
    weights = {name: r.take(f32, *shape) for name, shape in names}
    steps = []
    for n in (3, 1, 1):
        x = r.take(np.int32, n).long()
        y = r.take(f32, n, HIDDEN)
        steps.append((x, y))
    assert r.offset == len(r.buf), "the vector file layout changed"
    return weights, steps


def tiny_official_config(**overrides) -> GLMConfig:
    # Token ids are chosen so that id 2 is <sop>/[gMASK]-free input: the vectors give positions explicitly.
    base = dict(vocab_size=5, hidden_size=HIDDEN, num_layers=1, num_attention_heads=8, inner_hidden_size=INNER,
                bos_token_id=4, eos_token_id=4, mask_token_id=3, gmask_token_id=3, pad_token_id=0,
                torch_dtype="float32")
    return GLMConfig(**{**base, **overrides})


def build_model(weights, config: GLMConfig) -> GLM:
    model = GLM(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) == {"lm_head.weight"}
    return model


@torch.no_grad()
def run_three_steps(model: GLM, steps) -> list[torch.Tensor]:
    model.setup_kv_cache(1, 8)
    (x1, _), (x2, _), (x3, _) = steps
    blocked = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)[None, None]
    positions = [torch.tensor([[[0, 1, 1], [0, 0, 1]]]), torch.tensor([[[1], [2]]]), torch.tensor([[[1], [3]]])]
    out = [model.transformer(x1[None], positions[0], blocked, cache_position=0)[0]]
    out.append(model.transformer(x2[None], positions[1], None, cache_position=3)[0])
    out.append(model.transformer(x3[None], positions[2], None, cache_position=4)[0])
    return out


def test_matches_official_hidden_states_with_kv_cache():
    weights, steps = load_vectors()
    model = build_model(weights, tiny_official_config())
    for got, (_, expected) in zip(run_three_steps(model, steps), steps, strict=True):
        torch.testing.assert_close(got, expected, atol=5e-4, rtol=0)


def test_alpha_from_real_depth_would_break_parity():
    """Guards the spec's alpha pitfall: sqrt(2 * 1) instead of sqrt(2 * 28) must not match."""
    weights, steps = load_vectors()
    model = build_model(weights, tiny_official_config(residual_alpha=2 ** 0.5))
    got = run_three_steps(model, steps)[0]
    assert (got - steps[0][1]).abs().max() > 0.1


def test_positions_and_mask_derived_from_ids_match_official():
    """With id 1 as [gMASK] and id 2 as <sop>, the vectors' input [0, 1, 2] is a real GLM prompt, and
    calling the model on the ids alone must derive the official positions and mask."""
    weights, steps = load_vectors()
    config = tiny_official_config(bos_token_id=2, gmask_token_id=1, mask_token_id=0, eos_token_id=3, pad_token_id=4)
    model = build_model(weights, config)
    with torch.no_grad():
        out = model(steps[0][0][None])
    torch.testing.assert_close(out.hidden_states[0], steps[0][1], atol=5e-4, rtol=0)
    torch.testing.assert_close(out.logits[0], steps[0][1] @ weights["transformer.word_embeddings.weight"].T,
                               atol=2e-3, rtol=0)


def test_p_tuning_v2_prefix_encoder_matches_official():
    """P-Tuning v2 through glmkit's PrefixEncoder: the official prefix keys/values (no rotary, never
    masked) put into its embedding reproduce the official hidden states, with the KV cache."""
    path = DATA.with_name("glm_ptuning_v2_model.data")
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path}")
    pre_seq_len, heads, head_dim = 5, 8, 4
    r = Reader(path)
    prefix = r.take(np.float16, 2, heads, pre_seq_len, head_dim).float()  # [2 * layers, heads, pre, dim]
    weights, steps = _parse(r)  # then the same layout as glm_model.data
    # The official encoder's output row p is (layer, key/value, head, dim) flattened.
    weights["transformer.prefix_encoder.embedding.weight"] = prefix.permute(2, 0, 1, 3).reshape(pre_seq_len, -1)
    model = build_model(weights, tiny_official_config(pre_seq_len=pre_seq_len))
    for got, (_, want) in zip(run_three_steps(model, steps), steps, strict=True):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    model.transformer.prefix_encoder.embedding.weight.data.zero_()
    with torch.no_grad():
        changed = run_three_steps(model, steps)[0]
    assert (changed - steps[0][1]).abs().max() > 1e-2  # the prefix really is used
