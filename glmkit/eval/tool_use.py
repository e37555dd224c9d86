"""Held-out tool-use accuracy of a GLM-4-format chat model, per language.

A record (glmkit/training/data/tools.py writes them) is a user question with the tools offered to it and either
the call it needs (`call`: name and arguments), the tool's `observation` and a reference answer, or no call
(`kind` "direct": nothing fits; "not_offered": the tool it needs is not offered). Measured, greedy:

- right_tool_valid_args: the reply is a call of the expected tool whose arguments validate against the tool's JSON
  schema (jsonschema when installed, else a strict check of required keys, types, enums and patterns);
- exact_args: ... and the arguments equal the expected ones (numbers compared as numbers, spaces in expressions
  ignored);
- answer_from_observation: given the expected call and its observation, the next reply is text that contains the
  observation's values named by `answer_keys` (the temperature and city, the conversion's result, ...);
- direct: no call when no offered tool fits.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from glmkit.generation.generate import greedy_completions
from glmkit.models.glm import GLM
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer

Validator = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]


def validates(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> bool:
    """True when `arguments` satisfy the tool's `parameters` schema."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a test dependency
        return strict_check(arguments, schema)
    try:
        jsonschema.validate(dict(arguments), dict(schema))
    except jsonschema.ValidationError:
        return False
    return True


_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


def strict_check(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> bool:
    """The subset of JSON Schema the tools use: object, required, properties' type/enum/pattern, no extra keys."""
    if not isinstance(arguments, Mapping):
        return False
    properties = schema.get("properties", {})
    if any(k not in arguments for k in schema.get("required", ())):
        return False
    if schema.get("additionalProperties") is False and any(k not in properties for k in arguments):
        return False
    for key, value in arguments.items():
        spec = properties.get(key, {})
        kind = _TYPES.get(spec.get("type", ""), object)
        if not isinstance(value, kind) or (isinstance(value, bool) and spec.get("type") != "boolean"):
            return False
        if "enum" in spec and value not in spec["enum"]:
            return False
        if "pattern" in spec and not re.search(spec["pattern"], value):
            return False
    return True


def same_arguments(got: Mapping[str, Any], want: Mapping[str, Any]) -> bool:
    if set(got) != set(want):
        return False
    for key, value in want.items():
        other = got[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not isinstance(other, (int, float)) or abs(float(other) - float(value)) > 1e-9:
                return False
        elif isinstance(value, str) and isinstance(other, str):
            if value.replace(" ", "") != other.replace(" ", ""):
                return False
        elif other != value:
            return False
    return True


def _number_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def answer_has(answer: str, observation: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return all(_number_text(observation[k]) in answer for k in keys if k in observation)


def _prompts(tokenizer: Tokenizer, records: Sequence[dict], schemas: Mapping[str, dict], with_call: bool) -> list[list[int]]:
    fmt = chat_format_for(tokenizer)
    out = []
    for r in records:
        messages = list(r["messages"])
        if with_call:
            messages += [{"role": "assistant", "metadata": r["call"]["name"],
                          "content": json.dumps(r["call"]["arguments"], ensure_ascii=False)},
                         {"role": "observation", "content": json.dumps(r["observation"], ensure_ascii=False)}]
        out.append(fmt.render_ids(tokenizer, messages, [schemas[n] for n in r["tools"]] or None))
    return out


def _replies(model: GLM, tokenizer: Tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             progress: bool, what: str) -> list[str]:
    fmt = chat_format_for(tokenizer)
    texts: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=what, disable=not progress):
        batch = prompts[start:start + batch_size]
        texts += [tokenizer.decode(a) for a in greedy_completions(model, batch, max_new_tokens, fmt.stop_ids(tokenizer))]
    return texts


def parse_call(tokenizer: Tokenizer, text: str) -> tuple[str, dict] | None:
    """(name, arguments) when `text` is a call by the format's own parser (any name), else None."""
    message = chat_format_for(tokenizer).parse_response(text, None)
    calls = message.get("tool_calls") or []
    if not calls:
        return None
    function = calls[0]["function"]
    try:
        arguments = json.loads(function["arguments"])
    except (json.JSONDecodeError, TypeError):
        return None
    return function["name"], arguments


def evaluate_tool_use(model: GLM, tokenizer: Tokenizer, records: Sequence[dict], schemas: Mapping[str, dict],
                      answer_keys: Mapping[str, Sequence[str]], batch_size: int = 16, max_new_tokens: int = 48,
                      progress: bool = False, samples: int = 3) -> dict:
    """The metrics above per language and per tool/language, with a few sample replies per language."""
    was_training = model.training
    model.eval()
    replies = _replies(model, tokenizer, _prompts(tokenizer, records, schemas, False), batch_size, max_new_tokens,
                       progress, "tool calls")
    calls = [r for r in records if r["call"] is not None]
    answers = _replies(model, tokenizer, _prompts(tokenizer, calls, schemas, True), batch_size, max_new_tokens,
                       progress, "answers")
    model.train(was_training)
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    examples: dict[str, list[dict]] = defaultdict(list)

    def count(keys: Sequence[str], metric: str, ok: bool) -> None:
        for key in keys:
            counts[key][metric][0] += int(ok)
            counts[key][metric][1] += 1

    for r, text in zip(records, replies, strict=True):
        parsed = parse_call(tokenizer, text)
        lang = r["lang"]
        if r["call"] is None:
            count((lang, f"{r['kind']}/{lang}"), "direct", parsed is None and bool(text.strip()))
            continue
        name, arguments = parsed if parsed is not None else (None, None)
        right = name == r["call"]["name"]
        valid = right and validates(arguments, schemas[name]["parameters"])
        exact = valid and same_arguments(arguments, r["call"]["arguments"])
        keys = (lang, f"{r['tool']}/{lang}")
        count(keys, "right_tool", right)
        count(keys, "right_tool_valid_args", valid)
        count(keys, "exact_args", exact)
        if len(examples[lang]) < samples and not exact:
            examples[lang].append({"question": r["messages"][-1]["content"], "expected": r["call"], "reply": text})
    for r, text in zip(calls, answers, strict=True):
        ok = parse_call(tokenizer, text) is None and answer_has(text, r["observation"], answer_keys[r["tool"]])
        count((r["lang"], f"{r['tool']}/{r['lang']}"), "answer_from_observation", ok)
    report = {key: {metric: {"correct": c, "total": n, "accuracy": round(c / n, 4)} for metric, (c, n) in m.items()}
              for key, m in sorted(counts.items())}
    return {"per_language": {k: v for k, v in report.items() if "/" not in k},
            "per_tool": {k: v for k, v in report.items() if "/" in k}, "failures": dict(examples)}
