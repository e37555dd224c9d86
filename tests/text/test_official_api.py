"""The official Python API of each family on tiny random models over the test-trained tokenizers: ChatGLM2's
(query, response) history and `[Round n]`, ChatGLM3's role messages with tools and observations, GLM-4's template;
`model.process_response`, `tokenizer.parse_response` on every tokenizer, `glmkit.AutoTokenizer`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import glmkit
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.generation import chat as chat_lib
from glmkit.text.chat_format import CHATGLM2, ChatFormatError
from glmkit.text.chatglm3_format import CHATGLM3, TOOLS_SYSTEM_PROMPT
from glmkit.text.glm4_format import GLM4

from layouts import thudm_config

WEATHER = {"name": "get_weather", "description": "the weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _model_dir(tokenizer_dir, out, vocab):
    torch.manual_seed(0)
    model = glmkit.GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=vocab, seq_length=512)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    for path in tokenizer_dir.iterdir():
        shutil.copyfile(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def models(chatglm2_dir, chatglm3_dir, glm4_dir, glm4_hf_dir, tmp_path_factory):
    """name -> (model, tokenizer, directory): one tiny THUDM-layout model over each family's tokenizer."""
    out = {}
    for name, directory, vocab in [("chatglm2", chatglm2_dir, 1024), ("chatglm3", chatglm3_dir, 1024),
                                   ("glm4", glm4_dir, 1536), ("glm4-hf", glm4_hf_dir, 1536)]:
        path = _model_dir(directory, tmp_path_factory.mktemp(name), vocab)
        model, tokenizer = glmkit.load(path, progress=False)
        out[name] = model, tokenizer, path
    return out


def greedy(model, ids, stops, n):
    """The greedy continuation of `ids`, cut before the first stop id (not counting it), at most n tokens."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=list(stops))[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


def scripted(monkeypatch, replies, prompts):
    """Make chat's generator answer with `replies` (token lists, one per call) and record each prompt it is fed."""
    queue = list(replies)

    def fake_stream_tokens(model, sequences, params, **_options):
        prompts.append(list(sequences[0]))
        for token in queue.pop(0):
            yield torch.tensor([token])

    monkeypatch.setattr(chat_lib, "stream_tokens", fake_stream_tokens)


def test_glmkit_exports_auto_tokenizer_lazily(chatglm3_dir):
    from glmkit.text.auto import AutoTokenizer

    assert glmkit.AutoTokenizer is AutoTokenizer and "AutoTokenizer" in glmkit.__all__
    assert type(glmkit.AutoTokenizer.from_pretrained(chatglm3_dir)).__name__ == "ChatGLM3Tokenizer"


def test_chatglm2_chat_keeps_tuple_history_and_rounds(models):
    model, tokenizer, _ = models["chatglm2"]
    history = [("你好", "hello")]
    ids = tokenizer.encode("[Round 1]\n\n问：你好\n\n答：hello\n\n[Round 2]\n\n问：how are you\n\n答：")
    assert CHATGLM2.prompt_ids(tokenizer, "how are you", history) == ids
    tokens = greedy(model, ids, CHATGLM2.stop_ids(tokenizer), 6)
    response, new_history = model.chat(tokenizer, "how are you", history, do_sample=False, max_new_tokens=6)
    assert response == CHATGLM2.parse(tokenizer.decode(tokens)) and isinstance(response, str)
    assert new_history == [("你好", "hello"), ("how are you", response)]
    assert history == [("你好", "hello")]  # the caller's list is not changed
    streamed = [r for r, _ in model.stream_chat(tokenizer, "how are you", history, do_sample=False, max_new_tokens=6)]
    assert streamed[-1] == response
    with pytest.raises(ChatFormatError, match="no roles"):
        model.chat(tokenizer, "42", history, role="observation")
    assert model.process_response(" [[训练时间]] ok ") == "2023年 ok"  # ChatGLM2's process_response(response)


def test_the_official_chat_defaults_of_the_new_families(models):
    for name in ("chatglm2", "chatglm3", "glm4"):
        model, tokenizer, _ = models[name]
        params = chat_lib.chat_params(model, tokenizer)
        assert (params.max_length, params.top_p, params.temperature, params.do_sample) == (8192, 0.8, 0.8, True)


def test_chatglm3_chat_keeps_role_messages_and_the_last_token_of_a_cut_reply(models):
    model, tokenizer, _ = models["chatglm3"]
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": "hello"}]
    ids = tokenizer.build_chat_input("how are you", history)["input_ids"][0].tolist()
    stops = CHATGLM3.stop_ids(tokenizer)
    full = greedy(model, ids, stops, 40)
    n = min(len(full), 5)
    assert n >= 2, "the random model stops at once: pick another seed"
    response, new_history = model.chat(tokenizer, "how are you", history, do_sample=False, max_new_tokens=n)
    # stopped by length: every generated token is in the answer (the official chat() would drop the last one)
    expected, expected_history = CHATGLM3.process_response(tokenizer.decode(full[:n]),
                                                           [*history, {"role": "user", "content": "how are you"}])
    assert response == expected and new_history == expected_history
    assert new_history[:3] == [*history, {"role": "user", "content": "how are you"}]
    assert new_history[-1]["role"] == "assistant" and len(history) == 2
    assert tokenizer.decode(full[:n]) != tokenizer.decode(full[: n - 1])
    streamed = list(model.stream_chat(tokenizer, "how are you", history, do_sample=False, max_new_tokens=n))
    assert streamed[-1] == (response, new_history)
    # an observation turn is fed exactly as build_chat_input(..., role="observation") writes it
    obs = tokenizer.build_chat_input('{"t": 1}', new_history, role="observation")["input_ids"][0].tolist()
    reply, after = model.chat(tokenizer, '{"t": 1}', new_history, role="observation", do_sample=False,
                              max_new_tokens=4)
    assert reply == CHATGLM3.process_response(tokenizer.decode(greedy(model, obs, stops, 4)),
                                              [*new_history, {"role": "observation", "content": '{"t": 1}'}])[0]
    assert after[len(new_history)] == {"role": "observation", "content": '{"t": 1}'}


def test_chatglm3_tool_round_trip_through_model_chat(models, monkeypatch):
    model, tokenizer, _ = models["chatglm3"]
    system = {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": [WEATHER]}
    call_text = 'get_weather\n```python\ntool_call(city="北京")\n```'
    observation = tokenizer.convert_tokens_to_ids("<|observation|>")
    prompts: list[list[int]] = []
    scripted(monkeypatch, [tokenizer.encode(call_text, add_special_tokens=False) + [observation],
                           tokenizer.encode("\n北京 20 度", add_special_tokens=False) + [tokenizer.eos_token_id]],
             prompts)
    response, history = model.chat(tokenizer, "北京天气怎么样", [system], do_sample=False)
    assert prompts[0] == tokenizer.build_chat_input("北京天气怎么样", [system])["input_ids"][0].tolist()
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert history[:2] == [system, {"role": "user", "content": "北京天气怎么样"}]
    assert history[2]["role"] == "assistant" and history[2]["metadata"].strip() == "get_weather"
    assert "tool_call(city=\"北京\")" in history[2]["content"]
    # the hand-made reply through process_response, on the model and on the format: the same call
    hand = model.process_response(call_text, history[:2])
    assert hand == CHATGLM3.process_response(call_text, history[:2])
    assert hand[0] == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert tokenizer.parse_response(call_text)["tool_calls"][0]["function"] == \
        {"name": "get_weather", "arguments": '{"city": "北京"}'}
    # the tool result goes back as an observation; the model's answer is plain text
    result = json.dumps({"temperature": 20})
    answer, history = model.chat(tokenizer, result, history, role="observation", do_sample=False)
    assert prompts[1] == tokenizer.build_chat_input(result, history[:3], role="observation")["input_ids"][0].tolist()
    assert answer == "北京 20 度"
    assert [m["role"] for m in history] == ["system", "user", "assistant", "observation", "assistant"]


def test_chatglm3_a_malformed_call_comes_back_as_text(models):
    model, tokenizer, _ = models["chatglm3"]
    system = {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": [WEATHER]}
    bad = 'get_weather\n```python\ntool_call("北京")\n```'  # positional: the official eval raises TypeError
    response, history = model.process_response(bad, [system])
    assert response == bad and history[-1]["metadata"] == "get_weather"
    assert tokenizer.parse_response(bad) == {"role": "assistant", "content": bad}
    assert "tool_calls" not in tokenizer.parse_response(call := 'get_weather\n```python\ntool_call(city="x")\n```',
                                                        tools=[{"name": "other"}])
    assert "tool_calls" in tokenizer.parse_response(call, tools=[WEATHER])


@pytest.mark.parametrize("name", ["glm4", "glm4-hf"])
def test_glm4_chat_renders_the_template_and_parses_calls(models, monkeypatch, name):
    model, tokenizer, _ = models[name]
    history = [{"role": "system", "content": "Be brief."}]
    ids = tokenizer.apply_chat_template([*history, {"role": "user", "content": "你好"}], add_generation_prompt=True)
    stops = GLM4.stop_ids(tokenizer)
    tokens = greedy(model, ids, stops, 5)
    response, new_history = model.chat(tokenizer, "你好", history, do_sample=False, max_new_tokens=5)
    expected = GLM4.process_response(tokenizer.decode(tokens), [*history, {"role": "user", "content": "你好"}])
    assert (response, new_history) == expected
    # a tool call: tools on the first system message, the reply `name\n{json}` up to <|observation|>
    tools = [{"type": "function", "function": WEATHER}]
    system = {"role": "system", "content": "", "tools": tools}
    call_text = 'get_weather\n{"city": "北京"}'
    prompts: list[list[int]] = []
    scripted(monkeypatch, [tokenizer.encode(call_text, add_special_tokens=False) + [stops[2]]], prompts)
    call, history = model.chat(tokenizer, "北京天气", [system])
    assert prompts[0] == tokenizer.apply_chat_template([system, {"role": "user", "content": "北京天气"}])
    assert call == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert model.process_response(call_text, [system])[0] == call
    assert history[-1] == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}
    message = tokenizer.parse_response(call_text, tools=tools)
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "北京"}
    assert tokenizer.parse_response(call_text, tools=[{"type": "function", "function": {"name": "x"}}]) == \
        {"role": "assistant", "content": call_text}
    assert tokenizer.parse_response('get_weather\n{"city": ') == {"role": "assistant", "content": 'get_weather\n{"city":'}


def test_process_response_finds_the_format_without_a_chat(models):
    _, tokenizer, path = models["chatglm3"]
    model = glmkit.GLMForCausalLM.from_pretrained(path, progress=False)  # no tokenizer given: read from the directory
    system = {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": [WEATHER]}
    call_text = 'get_weather\n```python\ntool_call(city="x")\n```'
    assert model.process_response(call_text, [system])[0] == {"name": "get_weather", "parameters": {"city": "x"}}
    _, glm4_tokenizer, _ = models["glm4"]
    assert model.process_response('get_weather\n{"city": "x"}', [system], tokenizer=glm4_tokenizer)[0] == \
        {"name": "get_weather", "parameters": {"city": "x"}}
    bare = glmkit.GLMForCausalLM(model.config)
    with pytest.raises(ValueError, match="needs the model's chat format"):
        bare.process_response("x", [])


def test_every_tokenizer_parses_replies(models, tokenizer):
    assert tokenizer.parse_response("你好") == {"role": "assistant", "content": "你好"}  # ChatGLM-6B: text only
    assert models["chatglm2"][1].parse_response(' get_weather\n{"a": 1} ') == \
        {"role": "assistant", "content": 'get_weather\n{"a": 1}'}
    for name in ("chatglm3", "glm4", "glm4-hf"):
        parsed = models[name][1].parse_response("<|assistant|>\n just text ")
        assert parsed == {"role": "assistant", "content": "just text"}, name
        for garbage in ["", "\n", "get_weather\n```python\ntool_call(\n```", "x\n{", "<|assistant|>"]:
            assert models[name][1].parse_response(garbage)["role"] == "assistant"  # never raises


def test_each_tokenizer_parses_by_the_format_chat_uses(models, tokenizer):
    from glmkit.text.formats import chat_format_for

    for tok in [tokenizer, *(models[name][1] for name in models)]:
        assert type(tok).reply_format is chat_format_for(tok), type(tok).__name__
