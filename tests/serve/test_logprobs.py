"""logprobs and the usage chunk, with the official client against real `glmkit serve` processes on real (tiny)
models: the served log-probabilities must be the model's own log-softmax of its logits, computed here from one
full forward pass over prompt + reply (the server computed them step by step from its KV cache)."""

from __future__ import annotations

import openai
import pytest
import torch

import glmkit
from glmkit.text.chat_format import CHATGLM_6B

from servers import start_server

TOL = 1e-4
MESSAGES = [{"role": "user", "content": "the model reads"}]


def greedy_table(model, prompt_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """The greedy continuation and the log-softmax [len, V] of the logits over prompt + continuation."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        table = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return ids, table


@pytest.fixture(scope="module")
def causal_server(chatglm3_model):
    proc, base = start_server(chatglm3_model)
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_models_log_softmax(server, local, model_dir, api_key, stream):
    model, tokenizer = local
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    ask = {"model": model_dir.name, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True,
           "top_logprobs": 3}
    if stream:
        entries, content = [], ""
        for chunk in client.chat.completions.create(stream=True, **ask):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                entries += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        entries, content = choice.logprobs.content, choice.message.content
    prompt = CHATGLM_6B.render_ids(tokenizer, MESSAGES)
    ids, table = greedy_table(model, prompt, 6)
    assert len(entries) == 6 and content
    for j, entry in enumerate(entries):
        row = table[len(prompt) - 1 + j]
        assert abs(entry.logprob - float(row[ids[len(prompt) + j]])) < TOL
        top = row.topk(3).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=TOL)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the token is the most likely one
        assert entry.bytes == list(entry.token.encode("utf-8"))
    assert "".join(e.token for e in entries).strip() == tokenizer.decode(ids[len(prompt):]).strip()


@pytest.mark.parametrize("stream", [False, True])
def test_completions_echo_logprobs_cover_the_prompt_too(causal_server, chatglm3_model, stream):
    model, tokenizer = glmkit.load(chatglm3_model, progress=False)
    text = "the model reads the"
    ask = {"model": causal_server.models.list().data[0].id, "prompt": text, "max_tokens": 4, "temperature": 0,
           "logprobs": 2, "echo": True}
    if stream:
        tokens, values, tops, offsets, reply = [], [], [], [], ""
        for chunk in causal_server.completions.create(stream=True, **ask):
            for choice in chunk.choices:
                reply += choice.text
                if choice.logprobs:
                    tokens += choice.logprobs.tokens
                    values += choice.logprobs.token_logprobs
                    tops += choice.logprobs.top_logprobs
                    offsets += choice.logprobs.text_offset
    else:
        choice = causal_server.completions.create(**ask).choices[0]
        reply, lp = choice.text, choice.logprobs
        tokens, values, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    prompt = tokenizer.encode(text)
    ids, table = greedy_table(model, prompt, 4)
    assert reply.startswith(text) and len(tokens) == len(values) == len(tops) == len(ids)
    assert values[0] is None and tops[0] is None  # the first prompt token has nothing before it
    for i in range(1, len(ids)):
        assert abs(values[i] - float(table[i - 1, ids[i]])) < TOL, i
        assert max(tops[i].values()) == pytest.approx(float(table[i - 1].max()), abs=TOL)
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_logprobs_on_a_prefix_lm_are_a_400(server, model_dir, api_key):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_dir.name, prompt="hi", max_tokens=2, logprobs=1, echo=True)
    assert "causal model" in info.value.body["message"]


def test_top_logprobs_without_logprobs_is_a_400(server, model_dir, api_key):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_dir.name, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_include_usage_ends_the_stream_with_a_usage_chunk(server, model_dir, api_key, route):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    ask = {"model": model_dir.name, "max_tokens": 5, "temperature": 0, "n": 2, "stream": True,
           "stream_options": {"include_usage": True}}
    if route == "chat":
        chunks = list(client.chat.completions.create(messages=MESSAGES, **ask))
        plain = client.chat.completions.create(**{**ask, "stream": False, "stream_options": None}, messages=MESSAGES)
    else:
        chunks = list(client.completions.create(prompt="the model", **ask))
        plain = client.completions.create(**{**ask, "stream": False, "stream_options": None}, prompt="the model")
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None and c.choices for c in body)
    assert last.usage.model_dump() == plain.usage.model_dump()
    assert last.usage.completion_tokens == 10
    without = list(client.chat.completions.create(messages=MESSAGES, **{**ask, "stream_options": None}))
    assert all(c.usage is None and c.choices for c in without)
