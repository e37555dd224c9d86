"""Structured output end to end: the official openai client against real `glmkit serve` processes.

response_format (json_schema, json_object) on the shipped demo model, sampled at temperature 1.0: every reply
must parse and validate (jsonschema), alone, streamed, n at a time and alongside other schemas; logprobs under a
grammar must be the model's log-softmax over the allowed tokens only, computed here from a full forward pass and
the schema's finite set of documents; and a schema the grammar layer cannot enforce is a 400 in OpenAI's shape.
Forced tool calls are tests/serve/test_forced_tools.py.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

import glmkit
from glmkit.text.chat_format import CHATGLM_6B

from servers import start_server

DEMO = Path(__file__).resolve().parents[2] / "glmkit" / "assets" / "demo-model"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", "fish"]}, "tags": {"type": "array", "items": {"enum": ["kind", "tall"]},
                                                      "maxItems": 2}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
# The longest reply PERSON allows, in bytes: ' {"name": "' + 8 four-byte characters + '", "age": 120, "pet": "fish",
# "tags": ["kind", "tall"]}' is under 90, and every token is at least one byte, so 96 tokens always suffice.
PERSON_TOKENS = 96


def response_format(schema: dict, name: str = "reply") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo():
    proc, base = start_server(DEMO, "--max-batch", "16", "--max-queue", "128")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_a_hundred_sampled_replies_all_validate_against_the_schema(demo):
    client = client_of(demo)

    def ask(i: int, n: int) -> list:
        # choice j samples with seed + j: requests 100 apart share no seed
        reply = client.chat.completions.create(model="demo-model", messages=ASK, n=n, temperature=1.0, seed=100 * i,
                                               max_tokens=PERSON_TOKENS, response_format=response_format(PERSON))
        return reply.choices

    with ThreadPoolExecutor(7) as pool:  # concurrent requests: the engine batches their choices together
        choices = [c for cs in pool.map(ask, range(7), [16] * 6 + [4]) for c in cs]
    assert len(choices) == 100
    replies = set()
    for choice in choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        replies.add(choice.message.content)
    assert len(replies) > 50  # sampled, not one reply a hundred times


def test_json_object_replies_are_json_objects(demo):
    reply = client_of(demo).chat.completions.create(model="demo-model", messages=ASK, n=8, temperature=0.7, seed=1,
                                                    max_tokens=250, response_format={"type": "json_object"})
    finished = [c for c in reply.choices if c.finish_reason == "stop"]
    assert finished, "no reply ended within max_tokens"
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in reply.choices:  # those cut by max_tokens are still an object's beginning
        assert choice.message.content.startswith("{")


def test_a_streamed_reply_validates(demo):
    stream = client_of(demo).chat.completions.create(model="demo-model", messages=ASK, temperature=1.0, seed=5,
                                                     max_tokens=PERSON_TOKENS, stream=True,
                                                     response_format=response_format(PERSON))
    text, finish = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_concurrent_requests_each_keep_their_own_schema(demo):
    client = client_of(demo)
    schemas = [PERSON, {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
               {"enum": ["yes", "no"]}, {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10,
                                                                                "maximum": 99}},
                                         "required": ["n"], "additionalProperties": False}]

    def ask(schema: dict) -> list:
        return client.chat.completions.create(model="demo-model", messages=ASK, n=3, temperature=1.0, seed=3,
                                              max_tokens=PERSON_TOKENS,
                                              response_format=response_format(schema)).choices

    with ThreadPoolExecutor(len(schemas)) as pool:
        answers = list(pool.map(ask, schemas))
    for schema, choices in zip(schemas, answers, strict=True):
        for choice in choices:
            jsonschema.validate(json.loads(choice.message.content), schema)


def test_completions_take_a_response_format_too(demo):
    reply = client_of(demo).completions.create(model="demo-model", prompt="A person as JSON:", n=4, temperature=1.0,
                                               seed=2, max_tokens=PERSON_TOKENS,
                                               extra_body={"response_format": response_format(PERSON)})
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)


COLORS = ["alpha", "beta", "gamma delta"]


def test_logprobs_under_a_grammar_come_from_the_masked_scores(demo):
    """Greedy over an enum: each token and its top alternatives must be the model's log-softmax over only the
    tokens that keep the reply a prefix of one of the three documents, recomputed here without the grammar layer."""
    choice = client_of(demo).chat.completions.create(
        model="demo-model", messages=ASK, temperature=0, max_tokens=20, logprobs=True, top_logprobs=5,
        response_format=response_format({"enum": COLORS})).choices[0]
    assert choice.finish_reason == "stop" and json.loads(choice.message.content) in COLORS
    model, tokenizer = glmkit.load(DEMO, progress=False)
    table = tokenizer.token_bytes()
    documents = [json.dumps(c).encode() for c in COLORS]
    ids = CHATGLM_6B.render_ids(tokenizer, ASK)
    prompt_length, written = len(ids), b""
    for entry in choice.logprobs.content:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        allowed = [t for t, b in enumerate(table) if b is not None and _opens(written + b, documents)]
        logprobs = logits[allowed] - torch.logsumexp(logits[allowed], 0)
        best = int(logprobs.argmax())
        ids.append(allowed[best])
        written += table[allowed[best]]
        assert entry.logprob == pytest.approx(float(logprobs[best]), abs=1e-4)
        expected_top = logprobs.topk(min(5, len(allowed))).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected_top, abs=1e-4)
    assert tokenizer.decode(ids[prompt_length:]).strip() == choice.message.content
    assert written.lstrip(b" ") in documents  # complete: the server stopped there, as a grammar ends


def _opens(written: bytes, documents: list[bytes]) -> bool:
    """Whether `written` (after the one leading space SentencePiece's dummy prefix may add) begins a document."""
    return any(d.startswith(written) or (written[:1] == b" " and d.startswith(written[1:])) for d in documents)


@pytest.mark.parametrize("body, param, code, words", [
    ({"response_format": response_format({"type": "array", "uniqueItems": True})}, "response_format",
     "unsupported_parameter", "uniqueItems"),
    ({"response_format": response_format({"oneOf": [{"type": "string"}, {"type": "integer"}]})}, "response_format",
     "unsupported_parameter", "oneOf"),
    ({"response_format": response_format({"type": "string", "pattern": "(?<=a)b"})}, "response_format",
     "invalid_schema", "Lookbehind"),
    ({"response_format": {"type": "json_schema"}}, "response_format", None, "json_schema goes with"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", None, "json_schema"),
])
def test_a_response_format_that_cannot_be_enforced_is_a_400(demo, body, param, code, words):
    r = httpx.post(f"{demo}/v1/chat/completions", json={"model": "demo-model", "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    if code is not None:
        assert error["code"] == code
