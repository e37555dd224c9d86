"""Forced tool calls end to end: the official openai client against real `glmkit serve` processes of tiny random
GLM-4 and ChatGLM3 models. A random model never writes a well-formed call by itself; with tool_choice "required" or
a named function the grammar writes the family's call syntax, so every reply must come back as tool_calls (finish
reason "tool_calls") whose arguments validate against the tool's parameters (jsonschema). A tool whose schema the
grammar layer cannot enforce is a 400 naming `tools`.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from servers import start_server


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 6},
                                                "unit": {"enum": ["C", "F"]}, "metric": {"type": "boolean"}},
                                                "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 3}}, "required": ["zone"]}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def tool_server(request, glm4_model, chatglm3_model):
    model = glm4_model if request.param == "glm4" else chatglm3_model
    proc, base = start_server(model, "--max-batch", "8")
    yield base, model.name
    proc.terminate()
    proc.wait(timeout=30)


def _validate_call(call, tools: list[dict]) -> str:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_") and call.type == "function"
    return call.function.name


def test_tool_choice_required_forces_a_valid_call_of_one_of_the_tools(tool_server):
    base, name = tool_server
    reply = client_of(base).chat.completions.create(model=name, messages=QUESTION, tools=[WEATHER, TIME],
                                                    tool_choice="required", n=6, temperature=1.0, seed=0,
                                                    max_tokens=120)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        _validate_call(call, [WEATHER, TIME])


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_forces_that_tool(tool_server, stream):
    base, name = tool_server
    ask = {"model": name, "messages": QUESTION, "tools": [WEATHER, TIME], "temperature": 1.0, "seed": 4,
           "max_tokens": 120, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    client = client_of(base)
    if not stream:
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert _validate_call(call, [TIME]) == "get_time"
        return
    arguments, names, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **ask):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                names += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert names == "get_time" and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])


def test_without_a_forced_choice_the_random_model_writes_no_call(tool_server):
    base, name = tool_server
    choice = client_of(base).chat.completions.create(model=name, messages=QUESTION, tools=[WEATHER],
                                                     temperature=0, max_tokens=20).choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize("tool, words", [
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "xs": {"type": "array", "uniqueItems": True}}}}}, "uniqueItems"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "multipleOf": 2}}}}}, "multipleOf"),
])
def test_a_forced_call_whose_schema_cannot_be_enforced_is_a_400(tool_server, tool, words):
    base, name = tool_server
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": name, "messages": QUESTION, "tools": [tool],
                                                        "tool_choice": "required"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "tools" and error["code"] == "unsupported_parameter" and words in error["message"]
