"""The GLM-4 demo model's tool data (glmkit/training/data/tools.py): held-out values and phrasings are disjoint from
training, every call validates against its tool's schema and copies its values from the question, every answer
repeats the observation's values, and a tool that is not offered is never called."""

import json

import pytest

from glmkit.eval.tool_use import answer_has, strict_check, validates
from glmkit.training.data import tools as td

PLACES = td.all_places(None)  # the built-in Chinese cities: no registry download in the fast tests


@pytest.fixture(scope="module")
def split():
    train = td.generate(3000, False, 0, PLACES)
    held = td.generate(0, True, 0, PLACES, per_kind={"call": 150, "direct": 20, "not_offered": 20})
    return train, held


def test_held_out_values_and_templates_are_disjoint_from_training(split):
    train, held = split
    report = td.split_report(train, held)
    assert report["shared_values"] == [] and report["shared_templates"] == []
    cities = lambda records: {r["call"]["arguments"].get("city") for r in records if r["call"]} - {None}  # noqa: E731
    assert cities(train) and cities(held) and not cities(train) & cities(held)
    questions = lambda records: {r["messages"][0]["content"] for r in records if r["kind"] == "call"}  # noqa: E731
    assert not questions(train) & questions(held)
    for tool, lang in td.Q:  # both sides keep phrasings of every tool and language
        assert td.template_split(True)[(tool, lang)] and td.template_split(False)[(tool, lang)], (tool, lang)


def test_every_call_validates_and_copies_its_values_from_the_question(split):
    for r in split[0] + split[1]:
        if r["call"] is None:
            continue
        schema = td.TOOLS[r["call"]["name"]]["parameters"]
        args = r["call"]["arguments"]
        assert validates(args, schema) and strict_check(args, schema), r
        assert r["call"]["name"] in r["tools"]
        question = r["messages"][0]["content"]
        for key, value in args.items():
            if key in ("city", "timezone", "expression"):
                assert value in question, (value, question)
            if key in ("from_unit", "to_unit"):
                assert value in td.UNIT_SYMBOLS


def test_answers_repeat_the_observation_and_not_offered_tools_are_never_called(split):
    kinds = set()
    for r in split[0]:
        kinds.add(r["kind"])
        if r["call"] is not None:
            assert answer_has(r["answer"], r["observation"], td.ANSWER_KEYS[r["tool"]]), r
        elif r["kind"] == "not_offered":
            assert r["tool"] not in r["tools"]
    assert kinds == {"call", "direct", "not_offered"}
    langs = {r["lang"] for r in split[0]}
    assert langs == {"en", "zh"}


def test_the_strict_check_rejects_what_jsonschema_rejects():
    schema = td.TOOLS["calculate"]["parameters"]
    for bad in ({}, {"expression": 3}, {"expression": "import os"}, {"expression": "1+1", "x": 1}):
        assert not strict_check(bad, {**schema, "additionalProperties": False})
    assert not validates({"expression": "import os"}, schema)
    weather = td.TOOLS["get_weather"]["parameters"]
    assert not validates({"city": "Paris", "unit": "kelvin"}, weather) and not strict_check({"city": "Paris", "unit": "kelvin"}, weather)


def test_values_come_out_as_json_numbers_and_conversions_are_right():
    assert td.convert(100, "c", "f") == 212 and td.convert(1, "km", "m") == 1000
    assert td.evaluate("(836 * 39) - 369") == 32235 and td.evaluate("7 / 2") == 3.5
    assert json.dumps(td.json_number("12.5")) == "12.5" and json.dumps(td.json_number("40")) == "40"
