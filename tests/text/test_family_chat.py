"""A ChatGLM3-format model end to end: `glmkit.load` picks the tokenizer from the repo's files, chat speaks the
tokenizer's format (role tokens built message by message, replies ending at the role tokens), and `glmkit serve`
answers the OpenAI chat API in that format."""

import torch
from openai import OpenAI

import glmkit
from glmkit.text.chatglm3_format import CHATGLM3
from glmkit.text.chatglm3_tokenizer import ChatGLM3Tokenizer
from glmkit.text.formats import chat_format_for

from servers import start_server


def test_load_picks_the_chatglm3_tokenizer_and_chat_feeds_build_chat_input(chatglm3_model):
    model, tokenizer = glmkit.load(chatglm3_model, progress=False)
    assert isinstance(tokenizer, ChatGLM3Tokenizer) and chat_format_for(tokenizer) is CHATGLM3
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hello"}]
    expected = tokenizer.build_chat_input("how are you", history)["input_ids"][0].tolist()
    assert CHATGLM3.prompt_ids(tokenizer, "how are you", history) == expected
    stops = CHATGLM3.stop_ids(tokenizer)
    assert set(stops) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>"),
                          tokenizer.convert_tokens_to_ids("<|observation|>")}
    # chat's reply is the greedy continuation of exactly those ids, cut at the first stop id
    out = model.generate(torch.tensor([expected]), max_new_tokens=12, eos_token_id=list(stops))[0, len(expected):]
    tokens = out.tolist()
    tokens = tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
    response, new_history = model.chat(tokenizer, "how are you", history, do_sample=False, max_length=len(expected) + 12)
    assert response == CHATGLM3.parse(tokenizer.decode(tokens))
    assert response and new_history[-2:] == [{"role": "user", "content": "how are you"},
                                             {"role": "assistant", "metadata": "", "content": response}]


def test_the_server_answers_in_the_tokenizers_chat_format(chatglm3_model):
    model, tokenizer = glmkit.load(chatglm3_model, progress=False)
    proc, base = start_server(chatglm3_model)
    try:
        client = OpenAI(base_url=f"{base}/v1", api_key="none")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages,
                                               max_tokens=10, temperature=0)
        ids = CHATGLM3.render_ids(tokenizer, messages)
        stops = list(CHATGLM3.stop_ids(tokenizer))
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, eos_token_id=stops)[0, len(ids):].tolist()
        out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
        assert reply.choices[0].message.content == CHATGLM3.parse(tokenizer.decode(out)) != ""
        assert reply.usage.prompt_tokens == len(ids)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_terminal_chat_keeps_the_familys_history_shape(chatglm3_model, capsys):
    """`glmkit chat` on ChatGLM3 keeps role messages (a tuple history would lose roles and tool calls)."""
    from glmkit.cli.chat import answer_turn

    model, tokenizer = glmkit.load(chatglm3_model, progress=False)
    options = {"max_length": 400, "do_sample": False}
    first = answer_turn(model, tokenizer, "你好", [], options)
    assert first[0] == {"role": "user", "content": "你好"} and first[-1]["role"] == "assistant"
    second = answer_turn(model, tokenizer, "how are you", first, options)
    assert second[: len(first)] == first and second[len(first)] == {"role": "user", "content": "how are you"}
    printed = capsys.readouterr().out
    assert printed.count("GLM: ") == 2 and first[-1]["content"] in printed
