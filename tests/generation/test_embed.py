"""Embeddings (glmkit.generation.embed) on tiny random models of every layout: the pooling each family documents,
computed here from the model's own forward pass, and the same vector alone or in any padded batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmkit import GLMForCausalLM
from glmkit.generation.embed import check_inputs, embed, plan_batches, pooling

from layouts import hf_config, hf_state, thudm_config, thudm_state, write_checkpoint
from tiny import GMASK, SOP, random_model, tiny_config, tiny_glm130b_config, write_chat_model

TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=["chatglm-6b", "glm-130b", "chatglm3", "glm4-0414"])
def family_model(request, tmp_path_factory):
    """(name, model): the 2D and 1D prefix-LMs, THUDM's causal layout and transformers' glm4 (sandwich norms)."""
    name = request.param
    if name == "chatglm-6b":
        return name, random_model(tiny_config())
    if name == "glm-130b":
        return name, random_model(tiny_glm130b_config())
    out = tmp_path_factory.mktemp(name)
    if name == "chatglm3":
        write_checkpoint(out, thudm_state(), thudm_config())
    else:
        write_checkpoint(out, hf_state(sandwich=True), hf_config("glm4"))
    return name, GLMForCausalLM.from_pretrained(out, progress=False, dtype="float32").eval()


def inputs_for(name: str) -> list[list[int]]:
    """Inputs of different lengths as each family's tokenizer writes a prompt: the prefix-LMs end in
    [gMASK] <sop>, the causal ones start with them (ids of the 256/128-id tiny vocabularies)."""
    bodies = [[5, 17, 42, 9, 88], [60], [7, 130, 11, 3, 90, 91, 92, 93, 94, 12, 14], [33, 34], [100, 101, 102]]
    if name in ("chatglm-6b", "glm-130b"):
        return [[*body, GMASK, SOP] for body in bodies]
    return [[64, 65, *(t % 60 for t in body)] for body in bodies]


@torch.no_grad()
def expected(model, ids: list[int]) -> torch.Tensor:
    """The documented pooling, from the model's own forward pass (positions and mask derived as the official model
    does): the last token's final hidden state (causal), or the mean over the tokens (prefix-LM); unit length."""
    hidden = model(torch.tensor([ids])).hidden_states[0]
    return F.normalize(hidden[-1] if model.config.causal else hidden.mean(0), dim=-1)


def test_each_family_pools_as_documented(family_model):
    name, model = family_model
    assert pooling(model) == ("last" if name in ("chatglm3", "glm4-0414") else "mean")
    inputs = inputs_for(name)
    got = embed(model, inputs)
    assert got.dtype == torch.float32 and got.shape == (len(inputs), model.config.hidden_size)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(inputs)), **TOL)
    for row, ids in zip(got, inputs, strict=True):
        torch.testing.assert_close(row, expected(model, ids), **TOL)


@pytest.mark.parametrize("budget", [1, 24, 10_000])
def test_a_batch_gives_each_input_its_vector_alone(family_model, budget):
    """Padding never leaks: one batch, several, or one input per pass, the same vectors (fp32, 1e-5)."""
    _, model = family_model
    inputs = inputs_for(family_model[0])
    alone = torch.cat([embed(model, [ids]) for ids in inputs])
    torch.testing.assert_close(embed(model, inputs, batch_tokens=budget), alone, **TOL)


def test_no_logits_are_computed(family_model):
    _, model = family_model
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        embed(model, inputs_for(family_model[0]))
    finally:
        handle.remove()
    assert calls == []


@torch.no_grad()
def test_prefix_lm_ids_without_sop_are_read_as_all_context():
    """Token ids a client sends need no [gMASK] <sop>: every token sees every other, positions 0..n-1."""
    model = random_model(tiny_config())
    ids = [5, 17, 42, 9, 88, 7]
    n = len(ids)
    positions = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)])[None]
    hidden = model(torch.tensor([ids]), positions, torch.zeros(1, 1, n, n, dtype=torch.bool)).hidden_states[0]
    torch.testing.assert_close(embed(model, [ids])[0], F.normalize(hidden.mean(0), dim=-1), **TOL)
    torch.testing.assert_close(embed(model, [ids, [*ids, GMASK, SOP], [3]])[0], embed(model, [ids])[0], **TOL)


def test_a_bf16_model_gives_unit_fp32_vectors():
    model = random_model(tiny_config()).to(torch.bfloat16)
    got = embed(model, inputs_for("chatglm-6b"))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), **TOL)


@pytest.mark.parametrize("inputs, message", [
    ([], "list of inputs is empty"),
    ([[5, 6], []], "input 1 is empty"),
    ([[5], list(range(3, 100))], "input 1 has 97 tokens, more than the model's context of 96"),
    ([[5], [6], [7, 256]], r"input 2 holds token id 256, outside the model's vocabulary \(0 to 255\)"),
    ([[-1]], "input 0 holds token id -1"),
])
def test_inputs_the_model_cannot_take_are_named(inputs, message):
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=message):
        check_inputs(model, inputs)
    with pytest.raises(ValueError, match=message):
        embed(model, inputs)


def test_batches_stay_within_the_budget_and_the_padding_longest_first():
    lengths = [5, 40, 3, 40, 12, 7, 90, 1]
    batches = plan_batches(lengths, budget=80)
    assert sorted(i for rows in batches for i in rows) == list(range(len(lengths)))
    for rows in batches:
        padded = len(rows) * max(lengths[i] for i in rows)
        assert len(rows) == 1 or (padded <= 80 and sum(lengths[i] for i in rows) >= 0.75 * padded)
    order = [lengths[i] for rows in batches for i in rows]
    assert order == sorted(lengths, reverse=True)
    assert batches == [[6], [1, 3], [4, 5], [0, 2], [7]]
    assert plan_batches(lengths, budget=80, max_padding=1.0) == [[6], [1, 3], [4, 5, 0, 2, 7]]


def test_model_embed_encodes_texts_as_prompts(tokenizer, tmp_path):
    import glmkit

    model, tok = glmkit.load(write_chat_model(tmp_path / "m", tokenizer), progress=False)
    texts = ["hello world", "你好", "a somewhat longer sentence to embed"]
    got = model.embed(tok, texts)
    assert got.shape == (3, model.config.hidden_size)
    for row, text in zip(got, texts, strict=True):
        torch.testing.assert_close(row, expected(model, tok.encode(text)), **TOL)
    one = model.embed(tok, "你好")
    assert one.shape == (model.config.hidden_size,)
    torch.testing.assert_close(one, got[1], **TOL)
