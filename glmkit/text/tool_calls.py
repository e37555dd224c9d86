"""Tool schemas and tool calls: what ChatGLM3 and GLM-4 write, read back into OpenAI's message shape.

Why here and why `ast`: the official ChatGLM3 parser `eval`s the model's `tool_call(...)` line - arbitrary code
from model output (pitfall 24). glmkit parses it with `ast` and accepts only keyword arguments whose values are
Python literals; anything else is a malformed call, returned as text, never an exception. GLM-4's calls are JSON
and go through `json.loads` the same way.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

ToolSchema = Mapping[str, Any]  # OpenAI {"type": "function", "function": {...}} or a bare {name, description, parameters}


class ToolSchemaError(ValueError):
    """A tool list the model cannot be shown: not a function schema, no name, parameters not a JSON Schema object."""


def function_schema(tool: ToolSchema) -> dict[str, Any]:
    """The bare function schema {name, description, parameters} of an OpenAI-shape or bare tool, checked."""
    if not isinstance(tool, Mapping):
        raise ToolSchemaError(f"a tool must be a JSON object, got {type(tool).__name__}")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if function is None:
        raise ToolSchemaError(f"tool type {tool.get('type')!r} is not 'function' (only GLM-4 knows built-in tools)")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolSchemaError(f"a tool needs a non-empty string 'name': {json.dumps(tool, ensure_ascii=False)[:120]}")
    parameters = function.get("parameters")
    if parameters is not None:
        check_json_schema(parameters, f"tool {function['name']!r} parameters")
    return dict(function)


def check_json_schema(schema: Any, where: str) -> None:
    """The structural JSON Schema rules a tool's parameters must meet (an object schema, typed properties)."""
    if not isinstance(schema, Mapping):
        raise ToolSchemaError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    kind = schema.get("type")
    types = {"object", "array", "string", "number", "integer", "boolean", "null"}
    kinds = kind if isinstance(kind, list) else [kind]
    if kind is not None and not all(isinstance(k, str) and k in types for k in kinds):
        raise ToolSchemaError(f"{where} has type {kind!r}, which is not a JSON Schema type ({sorted(types)})")
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        raise ToolSchemaError(f"{where}: 'properties' must be an object, got {type(properties).__name__}")
    for name, sub in properties.items():
        check_json_schema(sub, f"{where} property {name!r}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolSchemaError(f"{where}: 'required' must be a list of property names")


def tool_names(tools: Sequence[ToolSchema] | None) -> set[str] | None:
    """The callable names in `tools` (function names, and GLM-4 built-ins by type); None for no tool list."""
    if tools is None:
        return None
    names = set()
    for tool in tools:
        kind = tool.get("type", "function") if isinstance(tool, Mapping) else None
        names.add(function_schema(tool)["name"] if kind == "function" else str(kind))
    return names


def parse_tool_call_code(code: str) -> dict[str, Any] | None:
    """The keyword arguments of a `tool_call(k=v, ...)` expression (values: Python literals), or None when the
    code is anything else (positional arguments, other calls, names, syntax errors). Never evaluates it."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def strip_code_fence(content: str) -> str | None:
    """The code inside a ```...``` block taking the whole content (first and last lines are the fences), or None."""
    lines = content.strip().split("\n")
    if len(lines) < 2 or not lines[0].startswith("```") or lines[-1].strip() != "```":
        return None
    return "\n".join(lines[1:-1])


def openai_tool_call(name: str, arguments: Mapping[str, Any] | str) -> dict[str, Any]:
    """One entry of an OpenAI assistant message's `tool_calls` (arguments as a JSON string, non-ASCII kept)."""
    text = arguments if isinstance(arguments, str) else json.dumps(dict(arguments), ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def assistant_message(content: str | None, calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """An OpenAI-shape assistant message; `tool_calls` only when there are calls."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return message


def split_segments(output: str) -> list[tuple[str, str]]:
    """(metadata, content) per `<|assistant|>` segment, as the official process_response splits a reply: the
    metadata is the text before the first newline, the content the rest (no newline: no metadata)."""
    segments = []
    for segment in output.split("<|assistant|>"):
        metadata, newline, content = segment.partition("\n")
        segments.append((metadata, content) if newline else ("", segment))
    return segments


def call_arguments(message: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments dict) of each OpenAI `tool_calls` entry of an assistant message, checked."""
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, Mapping) else {}
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise ToolSchemaError(f"an assistant tool call has no function name: {call!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as error:
                raise ToolSchemaError(f"tool call {name!r} arguments are not JSON: {error}") from error
        if not isinstance(arguments, Mapping):
            raise ToolSchemaError(f"tool call {name!r} arguments must be a JSON object")
        calls.append((name, dict(arguments)))
    return calls
