"""An unmodified agent framework drives a tool loop against `glmkit serve`: LangChain's ChatOpenAI with bind_tools.

The loop is LangChain's own, as its docs write it: the model is bound to the tool with tool_choice naming it (the
call is forced, so even a tiny random model makes one), LangChain parses the reply's tool_calls, the tool runs,
its ToolMessage goes back with the conversation, and the model, bound to the tool without forcing, answers in text.
The servers are real `glmkit serve` processes over tiny random GLM-4 and ChatGLM3 models (the two call syntaxes).
"""

from __future__ import annotations

from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from servers import start_server


class WeatherQuery(BaseModel):
    city: str = Field(description="the city", max_length=8)
    unit: Literal["C", "F"] = Field(description="the unit of the temperature")


ran: list[dict] = []  # what the tool was run with


@tool(args_schema=WeatherQuery)
def get_weather(city: str, unit: str) -> str:
    """The weather in a city."""
    ran.append({"city": city, "unit": unit})
    return f"sunny in {city}, 21 degrees {unit}"


@pytest.fixture(scope="module", params=["glm4", "chatglm3"])
def served(request, glm4_model, chatglm3_model):
    model = glm4_model if request.param == "glm4" else chatglm3_model
    proc, base = start_server(model)
    yield request.param, base, model.name
    proc.terminate()
    proc.wait(timeout=30)


def test_langchain_runs_a_forced_call_the_tool_and_gets_a_text_answer(served):
    _, base, name = served
    llm = ChatOpenAI(model=name, base_url=f"{base}/v1", api_key="none", temperature=0, max_tokens=60,
                     max_retries=0, timeout=120)
    messages = [HumanMessage("What is the weather in Paris?")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert isinstance(called, AIMessage)
    (call,) = called.tool_calls  # parsed by LangChain from the OpenAI tool_calls
    assert call["name"] == "get_weather"
    WeatherQuery(**call["args"])  # the arguments hold the tool's schema, checked by its own pydantic model
    ran.clear()
    result = get_weather.invoke(call)  # LangChain runs the tool on its call: a ToolMessage with the call's id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"] and ran == [call["args"]]
    final = llm.bind_tools([get_weather]).invoke([*messages, called, result])
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert isinstance(final.content, str) and final.content.strip()
