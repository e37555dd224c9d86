"""`glmkit serve --model glm4-demo` with the official openai client: a question for an offered tool comes back as a
`tool_calls` message with arguments that validate, and the tool's result gives a text answer with its value. (A
calculation: the model copies numbers and expressions well; city names it does not copy yet, see its eval.json.)"""

import json

import pytest

from glmkit.eval.tool_use import validates
from glmkit.pretrained import GLM4_DEMO_DIR
from glmkit.training.data.tools import TOOLS

from servers import start_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(not (GLM4_DEMO_DIR / "config.json").exists(), reason="glm4-demo is not built")


@pytest.fixture(scope="module")
def client():
    proc, base = start_server("glm4-demo")
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="none")
    proc.terminate()
    proc.wait(timeout=30)


def test_a_tool_question_gets_tool_calls_and_the_result_gets_an_answer(client):
    tools = [{"type": "function", "function": TOOLS[name]} for name in ("get_weather", "calculate")]
    messages = [{"role": "user", "content": "What is the answer to 452 * 17 + 9?"}]
    reply = client.chat.completions.create(model="glm4-demo", messages=messages, tools=tools, temperature=0,
                                           max_tokens=40)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "calculate" and validates(arguments, TOOLS["calculate"]["parameters"])
    assert arguments["expression"].replace(" ", "") == "452*17+9"
    result = {"expression": arguments["expression"], "result": 7693}
    messages += [message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    answer = client.chat.completions.create(model="glm4-demo", messages=messages, tools=tools, temperature=0,
                                            max_tokens=40).choices[0].message
    assert not answer.tool_calls and "7693" in answer.content
