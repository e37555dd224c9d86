"""The constraint layer: grammars walked token by token over real tokenizers' vocabularies, checked from outside.

A walk picks random allowed tokens (leaning towards closing characters, so most walks end), and every document a
walk completes must parse (json.loads) and validate (jsonschema) against the schema, or, for tool calls, come back
from the family's own reply parser as a call whose arguments validate. One schema per enforced keyword, so a
keyword xgrammar silently stopped enforcing would show up here; the keywords it ignores must be refused.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

import glmkit
from glmkit.generation import constraints
from glmkit.generation.constraints import ENFORCED, ConstraintError, UnsupportedSchema, json_grammar, tool_call_grammar
from glmkit.text.chatglm3_format import CHATGLM3
from glmkit.text.chatglm3_tokenizer import ChatGLM3Tokenizer
from glmkit.text.glm4_format import GLM4
from glmkit.text.glm4_tokenizer import GLM4Tokenizer
from glmkit.text.tokenizer import ChatGLMTokenizer

DEMO = Path(__file__).resolve().parents[2] / "glmkit" / "assets" / "demo-model"
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
# One schema for each enforced keyword (the comment names it); each keeps its documents short enough to end.
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -3, "maximum": 250},  # minimum, maximum
                                      "b": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},  # exclusiveMinimum, exclusiveMaximum
    {"type": "string", "minLength": 2, "maxLength": 4},  # minLength, maxLength
    {"type": "string", "pattern": "^[a-c]{2}x[0-9]?$"},  # pattern
    # format: xgrammar's pattern for each, close to the RFCs' syntax but not exact (a day 31 in any month, an IPv4
    # octet "012"), so these two are checked by syntax below; JSON Schema itself treats format as an annotation
    {"type": "string", "format": "date"},
    {"type": "string", "format": "ipv4"},
    {"type": "string", "format": "uuid"},
    {"type": "array", "items": {"enum": [1, "x", None, True]}, "minItems": 1, "maxItems": 3},  # items, enum, ...
    {"type": "array", "prefixItems": [{"const": 1}, {"type": "string", "maxLength": 2}], "items": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 3}, {"type": "string", "maxLength": 2}]},  # anyOf
    {"type": ["integer", "null"], "minimum": 0, "maximum": 4},  # type as a list
    {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}},  # additionalProperties
     "additionalProperties": {"type": "boolean"}, "required": ["v"]},
    {"$defs": {"node": {"type": "object", "properties": {  # $defs, $ref (recursive)
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"},
    {"definitions": {"k": {"enum": ["p", "q"]}}, "type": "object", "properties": {"k": {"$ref": "#/definitions/k"}},
     "required": ["k"], "additionalProperties": False},
]
CLOSERS = (b'"', b"}", b"]", b"1")
OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|\d\d?|0\d\d)"
SYNTAX = {"date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "ipv4": rf"{OCTET}(\.{OCTET}){{3}}"}


@pytest.fixture(scope="module")
def demo() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def chatglm3(chatglm3_dir) -> ChatGLM3Tokenizer:
    return ChatGLM3Tokenizer.from_pretrained(chatglm3_dir)


@pytest.fixture(scope="module")
def glm4(glm4_dir) -> GLM4Tokenizer:
    return GLM4Tokenizer.from_pretrained(glm4_dir)


def allowed_ids(matcher, size: int) -> list[int]:
    return torch.nonzero(matcher.bias(size) == 0).view(-1).tolist()


def walk(grammar, tokenizer, stops, rng: random.Random, cap: int = 160) -> list[int] | None:
    """Random allowed tokens until the grammar is complete (or an allowed stop is picked); None if it never ends."""
    matcher, table, ids = grammar.matcher(stops), tokenizer.token_bytes(), []
    for _ in range(cap):
        allowed = allowed_ids(matcher, len(table))
        if any(s in allowed for s in stops) and rng.random() < 0.4:
            return ids
        text = [a for a in allowed if a not in stops]
        closing = [a for a in text if any(c in table[a] for c in CLOSERS)]
        token = rng.choice(closing if closing and rng.random() < 0.35 else text)
        matcher.advance(token)
        ids.append(token)
        if matcher.finished:
            return ids
    return None


def test_the_schemas_cover_every_enforced_keyword():
    used = set()

    def keywords(schema):
        if isinstance(schema, dict):
            used.update(schema)
            for value in schema.values():
                keywords(value)
        elif isinstance(schema, list):
            for value in schema:
                keywords(value)

    keywords(SCHEMAS)
    assert set(ENFORCED) <= used


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: ",".join(sorted(s)))
def test_every_completed_walk_validates(demo, schema):
    grammar = json_grammar(constraints.vocabulary(demo), schema)
    rng = random.Random(0)
    done = 0
    for _ in range(30):
        ids = walk(grammar, demo, [demo.eos_token_id], rng)
        if ids is None:
            continue
        value = json.loads(demo.decode(ids))
        if schema.get("format") in SYNTAX:
            assert re.fullmatch(SYNTAX[schema["format"]], value), value
            schema = {"type": "string"}
        jsonschema.validate(value, schema, format_checker=FORMATS)
        done += 1
    assert done >= 10


def test_any_json_object_after_the_families_answer_prefix(glm4):
    grammar = json_grammar(constraints.vocabulary(glm4), None, prefix=GLM4.answer_prefix)
    rng = random.Random(1)
    objects = [walk(grammar, glm4, list(GLM4.stop_ids(glm4)), rng, cap=300) for _ in range(20)]
    texts = [glm4.decode(ids) for ids in objects if ids is not None]
    assert len(texts) >= 10
    for text in texts:
        assert text.startswith("\n")
        assert isinstance(json.loads(text), dict)
        assert GLM4.parse(text) == text.strip()  # a plain answer to the format: its empty metadata line first


def spell(text: bytes, table: list[bytes | None]) -> list[int]:
    """Ids spelling `text` exactly, longest token first."""
    ids = {b: i for i, b in enumerate(table) if b}
    out = []
    while text:
        size = max(n for n in range(1, len(text) + 1) if text[:n] in ids)
        out.append(ids[text[:size]])
        text = text[size:]
    return out


def test_end_tokens_are_allowed_only_once_the_grammar_is_complete(demo):
    eos, size, table = demo.eos_token_id, len(demo), demo.token_bytes()
    vocab = constraints.vocabulary(demo)
    matcher = json_grammar(vocab, {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
                                   "additionalProperties": False}).matcher([eos])
    for token in spell(b'{"a": true', table):
        assert eos not in allowed_ids(matcher, size) and not matcher.finished
        matcher.advance(token)
    assert eos not in allowed_ids(matcher, size)
    matcher.advance(spell(b"}", table)[0])
    assert matcher.finished and allowed_ids(matcher, size) == [eos]  # complete: nothing but the end may follow
    number = json_grammar(vocab, {"type": "integer"}).matcher([eos])
    number.advance(spell(b"1", table)[0])
    assert eos in allowed_ids(number, size) and spell(b"2", table)[0] in allowed_ids(number, size)
    assert not number.finished  # complete, but it could go on: the model decides


def test_a_sentencepiece_reply_may_open_with_the_dummy_prefix_space(demo, glm4):
    demo_start = allowed_ids(json_grammar(constraints.vocabulary(demo), None).matcher([demo.eos_token_id]), len(demo))
    assert demo.convert_tokens_to_ids("▁") in demo_start  # decoding drops it: the reply still starts with "{"
    glm4_start = allowed_ids(json_grammar(constraints.vocabulary(glm4), None).matcher([glm4.eos_token_id]), len(glm4))
    assert {glm4.token_bytes()[i] for i in glm4_start} <= {b"{", b"{}", b'{"', b"{\n"}  # byte-level: no space first


def test_the_bias_masks_ids_past_the_tokenizer_and_leaves_allowed_scores_alone(demo):
    matcher = json_grammar(constraints.vocabulary(demo), None).matcher([demo.eos_token_id])
    bias = matcher.bias(len(demo) + 40)  # the demo model's embedding has 40 padding rows
    assert bias.shape == (len(demo) + 40,) and bool(torch.isinf(bias[len(demo):]).all())
    assert set(bias.unique().tolist()) == {0.0, float("-inf")}


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "units": {"enum": ["C", "F", None]}, "hours": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}, "tag": {"type": "null"}},
              "required": ["lat"]}}, "required": ["city"]}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                                    "maxLength": 3}}}}


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_forced_calls_parse_as_the_familys_tool_calls_with_valid_arguments(family, chatglm3, glm4):
    tokenizer, chat_format = (chatglm3, CHATGLM3) if family == "chatglm3" else (glm4, GLM4)
    grammar = tool_call_grammar(constraints.vocabulary(tokenizer), [WEATHER, TIME], chat_format.call_syntax)
    rng = random.Random(2)
    names = set()
    calls = 0
    for _ in range(40):
        ids = walk(grammar, tokenizer, list(chat_format.stop_ids(tokenizer)), rng)
        if ids is None:
            continue
        message = chat_format.parse_response(tokenizer.decode(ids), [WEATHER, TIME])
        (call,) = message["tool_calls"]
        tool = WEATHER if call["function"]["name"] == "get_weather" else TIME
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["parameters"])
        names.add(tool["name"])
        calls += 1
    assert calls >= 15 and names == {"get_weather", "get_time"}


@pytest.mark.parametrize("schema, word", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "oneOf"),  # xgrammar would enforce it as anyOf
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}, "multipleOf"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": "string", "format": "iri"}, "iri"),
    ({"$ref": "https://example.com/schema.json"}, "only references inside the schema"),
])
def test_keywords_that_are_not_enforced_are_refused_by_name(demo, schema, word):
    with pytest.raises(UnsupportedSchema, match=word):
        json_grammar(constraints.vocabulary(demo), schema)


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {}, "required": ["zz"]}, "which properties does not define"),
    ({"type": "string", "maxLength": -1}, "non-negative integer"),
    ({"type": "array", "maxItems": "3"}, "non-negative integer"),
    ({"enum": []}, "non-empty list"),
    ({"type": "object", "properties": {"a": 5}}, "must be a JSON Schema object"),
    (functools.reduce(lambda inner, _: {"type": "array", "items": inner}, range(40), {}), "nested more than 32"),
])
def test_malformed_or_unreachable_schemas_are_refused_before_compiling(demo, chatglm3, schema, words):
    with pytest.raises(ConstraintError, match=words):
        json_grammar(constraints.vocabulary(demo), schema)
    with pytest.raises(ConstraintError, match=words):  # ChatGLM3's own rules check them the same way
        tool_call_grammar(constraints.vocabulary(chatglm3), [{"name": "f", "parameters": {
            "type": "object", "properties": {"x": schema}, "required": ["x"]}}], "python")


def test_a_schema_that_does_not_compile_is_a_constraint_error(demo):
    with pytest.raises(ConstraintError, match="Lookbehind"):
        json_grammar(constraints.vocabulary(demo), {"type": "string", "pattern": "(?<=a)b"})


def test_chatglm3_calls_refuse_what_python_literals_cannot_carry(chatglm3):
    vocab = constraints.vocabulary(chatglm3)
    with pytest.raises(UnsupportedSchema, match="pattern"):
        tool_call_grammar(vocab, [{"name": "f", "parameters": {"type": "object", "properties": {
            "s": {"type": "string", "pattern": "^a$"}}}}], "python")
    with pytest.raises(ConstraintError, match="not a Python identifier"):
        tool_call_grammar(vocab, [{"name": "f", "parameters": {"type": "object", "properties": {
            "my-arg": {"type": "string"}}}}], "python")


def test_generate_with_a_grammar_gives_valid_json_for_every_row():
    model, tokenizer = glmkit.load(DEMO, progress=False)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    grammar = json_grammar(constraints.vocabulary(tokenizer), schema)
    batch = tokenizer(["Describe a cat as JSON:", "Give me an example:", "JSON"], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=60, do_sample=True, temperature=1.0, seed=0, grammar=grammar,
                         eos_token_id=tokenizer.eos_token_id)
    prompt_length = batch["input_ids"].shape[1]
    for row in out[:, prompt_length:].tolist():
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        jsonschema.validate(json.loads(tokenizer.decode(row[:end])), schema)


def test_without_xgrammar_a_grammar_is_refused_with_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now fails, as where it is not installed
    with pytest.raises(constraints.Unavailable, match="pip install"):
        constraints.vocabulary(ChatGLMTokenizer.from_pretrained(DEMO))  # a fresh tokenizer: nothing cached
