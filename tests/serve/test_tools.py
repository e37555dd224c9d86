"""Tool calls through the OpenAI API, end to end with the official client against a real server on loopback.

The model is the one thing replaced: a random tiny model never writes a well-formed call, so a scripted engine
client (it implements `EngineClient`) answers each prompt with a fixed token sequence, encoded by the family's
real tokenizer: a call when the conversation has no tool result yet, an answer after one. Everything else is the
real server: the routes, the family's chat format rendering the tools and the observation turn, the reply parsed
by the format's `parse_response`, the SSE stream of tool_calls deltas. Each test also checks the prompt the
engine got against the format's own rendering, so the tools and the observation turn are seen where they go.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from glmkit.engine.request import StepOutput
from glmkit.serve.app import build_app
from glmkit.text.chatglm3_format import CHATGLM3
from glmkit.text.chatglm3_tokenizer import ChatGLM3Tokenizer
from glmkit.text.glm4_format import GLM4
from glmkit.text.glm4_tokenizer import GLM4Tokenizer

from servers import free_port

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALLS = {"chatglm3": 'get_weather\n```python\ntool_call(city="Paris")\n```', "glm4": 'get_weather\n{"city": "Paris"}'}
MALFORMED = {"chatglm3": "get_weather\n```python\ntool_call(Paris)\n```", "glm4": "get_weather\n{city: Paris}"}
ANSWER = "\nIt is sunny in Paris."
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class ScriptedEngine:
    """An EngineClient whose 'model' writes `script(prompt_ids)` and then the format's <|observation|> / end id."""

    def __init__(self, tokenizer, script) -> None:
        self.tokenizer, self.script = tokenizer, script
        self.prompts: list[list[int]] = []
        self.observation = tokenizer.convert_tokens_to_ids("<|observation|>")

    queue_depth = 0
    running = 0

    async def submit(self, prompt_ids, params, request_id, logprobs=None, prompt_logprobs=False):
        self.prompts.append(list(prompt_ids))
        text = self.script(prompt_ids)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        end = params.eos_token_ids[0] if text.startswith("\n") else self.observation  # a call stops at <|observation|>

        async def outputs():
            for token in ids:
                await asyncio.sleep(0)
                yield StepOutput(request_id, token, None)
            yield StepOutput(request_id, end, "stop")

        return outputs()

    async def generate(self, prompt_ids, params, request_id):
        async for output in await self.submit(prompt_ids, params, request_id):
            yield output


class ScriptedServer:
    """build_app over a ScriptedEngine, served by uvicorn on a loopback port in a thread."""

    def __init__(self, tokenizer, chat_format, script) -> None:
        self.engine = ScriptedEngine(tokenizer, script)
        self.tokenizer, self.format = tokenizer, chat_format
        app = build_app(self.engine, tokenizer, chat_format, "scripted", 512)
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def rendered(self, messages, tools=None) -> list[int]:
        return self.format.render_ids(self.tokenizer, messages, tools=tools)


def weather_script(call: str):
    """A call until the conversation holds a tool result, then the answer."""
    def script(prompt_ids):
        return ANSWER if script.tokenizer.convert_tokens_to_ids("<|observation|>") in prompt_ids else call
    return script


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def family(request, chatglm3_dir, glm4_dir):
    if request.param == "chatglm3":
        return request.param, ChatGLM3Tokenizer.from_pretrained(chatglm3_dir), CHATGLM3
    return request.param, GLM4Tokenizer.from_pretrained(glm4_dir), GLM4


@pytest.fixture
def scripted(family):
    servers = []

    def start(script=None) -> ScriptedServer:
        name, tokenizer, chat_format = family
        script = script or weather_script(CALLS[name])
        script.tokenizer = tokenizer
        servers.append(ScriptedServer(tokenizer, chat_format, script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def collect_stream(stream) -> tuple[str, list[dict], str, list]:
    """(content, tool calls assembled from their deltas, finish_reason, the tool_calls deltas as sent)."""
    content, calls, finish, deltas = "", {}, None, []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                deltas.append(call.model_dump(exclude_none=True))
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, deltas


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_round_trip_call_result_answer(scripted, stream):
    server = scripted()
    client = server.client
    ask = {"model": "scripted", "tools": [WEATHER], "temperature": 0}
    if stream:
        content, calls, finish, deltas = collect_stream(client.chat.completions.create(
            messages=QUESTION, stream=True, **ask))
        # OpenAI's shape: the first delta names the call with arguments "", the next carries the arguments
        assert deltas[0]["id"] == calls[0]["id"] and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert deltas[0]["type"] == "function" and deltas[1]["function"] == {"arguments": calls[0]["arguments"]}
        call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
        assert content == "" and finish == "tool_calls"
    else:
        reply = client.chat.completions.create(messages=QUESTION, **ask)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert call_id.startswith("call_") and name == "get_weather" and json.loads(arguments) == {"city": "Paris"}
    assert server.engine.prompts[-1] == server.rendered(QUESTION, [WEATHER])

    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    result = {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "sunny", "celsius": 21}'}
    messages = [*QUESTION, assistant, result]
    if stream:
        content, calls, finish, _ = collect_stream(client.chat.completions.create(messages=messages, stream=True, **ask))
    else:
        final = client.chat.completions.create(messages=messages, **ask).choices[0]
        content, calls, finish = final.message.content, final.message.tool_calls or [], final.finish_reason
    assert (content, calls, finish) == ("It is sunny in Paris.", [], "stop")
    # the call and its result went to the model as the family's assistant call and observation turns
    prompt = server.engine.prompts[-1]
    assert prompt == server.rendered(messages, [WEATHER])
    observation = server.tokenizer.convert_tokens_to_ids("<|observation|>")
    assert prompt.count(observation) == 1


def test_tool_choice_none_renders_no_tools_and_reads_no_call(scripted, family):
    server = scripted()
    reply = server.client.chat.completions.create(model="scripted", messages=QUESTION, tools=[WEATHER],
                                                  tool_choice="none")
    choice = reply.choices[0]
    assert server.engine.prompts[-1] == server.rendered(QUESTION)  # no tools in the prompt
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "get_weather" in choice.message.content  # what the model wrote, as text


def test_a_named_tool_choice_renders_only_that_tool(scripted):
    server = scripted()
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = server.client.chat.completions.create(model="scripted", messages=QUESTION, tools=[TIME, WEATHER],
                                                  tool_choice=named)
    assert server.engine.prompts[-1] == server.rendered(QUESTION, [WEATHER])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
    # a call of another tool than the named one is not that call: text, finish_reason stop (this scripted engine
    # applies no grammar; tests/serve/test_forced_tools.py has the real engine force it)
    other = server.client.chat.completions.create(model="scripted", messages=QUESTION, tools=[TIME, WEATHER],
                                                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert server.engine.prompts[-1] == server.rendered(QUESTION, [TIME])
    assert other.choices[0].finish_reason == "stop" and not other.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_required_without_a_call_and_a_malformed_call_come_back_as_text(scripted, family, stream):
    name = family[0]
    for script_text, choice in ((ANSWER, "required"), (MALFORMED[name], "auto")):
        server = scripted(lambda ids, text=script_text: text)
        ask = {"model": "scripted", "messages": QUESTION, "tools": [WEATHER], "tool_choice": choice}
        if stream:
            content, calls, finish, _ = collect_stream(server.client.chat.completions.create(stream=True, **ask))
        else:
            reply = server.client.chat.completions.create(**ask).choices[0]
            content, calls, finish = reply.message.content, reply.message.tool_calls or [], reply.finish_reason
        assert calls == [] and finish == "stop" and content == server.format.parse(script_text)


def test_bad_tool_requests_are_400s_naming_the_field(scripted):
    server = scripted()
    url = f"{server.base}/v1/chat/completions"
    base = {"model": "scripted", "messages": QUESTION}
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "city": {"type": "text"}}}}}
    cases = [
        ({"tools": [bad_schema]}, "tools.0.function.parameters", "not a JSON Schema type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "not one of the tools"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}],
          "tools": [WEATHER]}, "messages", "must follow"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": "not json"}}]}, *QUESTION]}, "messages", "not JSON"),
    ]
    for extra, param, words in cases:
        r = httpx.post(url, json={**base, **extra}, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_tools_on_a_family_without_tools_are_a_400(server, model_dir, api_key):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_dir.name, messages=QUESTION, tools=[WEATHER])
    assert info.value.body["param"] == "tools" and "no tool calls" in info.value.body["message"]
