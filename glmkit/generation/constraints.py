"""Grammar-constrained decoding: each step, only the tokens that keep the reply inside a grammar may be sampled.

What it is for: a JSON reply that parses and validates against a JSON Schema (the server's `response_format`), and
a tool call forced into the family's call format with arguments that validate against the tool's parameters
(`tool_choice`). The grammar library is xgrammar, chosen by the overhead it adds to each generated token on this
CPU (bench/grammar_overhead.py; docs/serving.md has the numbers and the comparison with llguidance and
outlines-core). It is imported on first use, so glmkit imports and serves without it.

The pieces, cheapest first:
* `vocabulary(tokenizer)`: each token id's bytes (the tokenizer's `token_bytes`) as xgrammar's tokenizer table, and
  a compiler over it; built once per tokenizer (151K tokens take seconds), then cached.
* `Grammar`: one compiled grammar (`json_grammar`, `tool_call_grammar`), shared by every request that asks for it
  (xgrammar caches the compilation of a schema too). It is what `SamplingParams.grammar` carries.
* `Matcher`: one request's position in the grammar: the -inf bias of the tokens it forbids next, `advance(token)`,
  and `finished` once nothing but an end token can follow (the reply is complete). End tokens are allowed only when
  the grammar is complete.

Schemas are checked against the keywords this layer is known to enforce (`check_schema`): xgrammar ignores keywords
it cannot enforce (`uniqueItems`, `if`, `not`, ...) and enforces `oneOf` as `anyOf`, so a schema using one would
compile and then let through replies that do not validate. Such a schema is refused with ConstraintError instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glmkit.text.chatglm3_format import python_literal
from glmkit.text.protocol import Tokenizer


class ConstraintError(ValueError):
    """A schema or tool this layer cannot enforce, or a grammar that failed to compile: the caller's input."""


class UnsupportedSchema(ConstraintError):
    """A valid JSON Schema using a keyword (or format, or reference) that constrained decoding does not enforce."""


class Unavailable(ConstraintError):
    """The grammar library is not installed: constrained decoding cannot run here at all."""


# ----- which JSON Schema keywords are enforced

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly"})  # they say nothing about which documents are valid
ENFORCED = frozenset({"type", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "properties", "required",
                      "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "minLength",
                      "maxLength", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
                      "exclusiveMaximum"})
FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


MAX_DEPTH = 32  # schemas nested deeper are refused: the checks, the grammar writers and xgrammar all recurse


def check_schema(schema: Any, where: str = "schema", enforced: frozenset[str] = ENFORCED, depth: int = 0) -> None:
    """Raise ConstraintError naming the first keyword (with its place) that constrained decoding does not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    if depth > MAX_DEPTH:
        raise UnsupportedSchema(f"{where}: the schema is nested more than {MAX_DEPTH} levels deep")
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in enforced:
            raise UnsupportedSchema(f"{where} uses {key!r}, which constrained decoding cannot enforce; supported "
                                    f"keywords: {', '.join(sorted(enforced))}")
        _check_keyword(key, value, f"{where}.{key}", enforced, depth + 1)
    undefined = [name for name in schema.get("required", []) if name not in schema.get("properties", {})]
    if undefined:  # the grammar writes declared properties only, so these could never appear
        raise UnsupportedSchema(f"{where}.required lists {undefined}, which properties does not define: define them "
                                "in properties (constrained decoding writes only declared properties)")


COUNTS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})
BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _check_value(key: str, value: Any, where: str) -> None:
    """The shape JSON Schema gives each keyword's value, so a malformed one is a clear error here, not in a grammar."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in COUNTS and not (number and value == int(value) and value >= 0):
        raise ConstraintError(f"{where} must be a non-negative integer, got {value!r}")
    if key in BOUNDS and not (number and math.isfinite(value)):
        raise ConstraintError(f"{where} must be a finite number, got {value!r}")
    if key == "required" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConstraintError(f"{where} must be a list of property names")
    if key == "enum" and not (isinstance(value, list) and value):
        raise ConstraintError(f"{where} must be a non-empty list")
    if key == "pattern" and not isinstance(value, str):
        raise ConstraintError(f"{where} must be a regular expression (a string)")


def _check_keyword(key: str, value: Any, where: str, enforced: frozenset[str], depth: int) -> None:
    _check_value(key, value, where)
    if key in ("properties", "$defs", "definitions"):
        if not isinstance(value, Mapping):
            raise ConstraintError(f"{where} must be an object of schemas")
        for name, sub in value.items():
            check_schema(sub, f"{where}.{name}", enforced, depth)
    elif key in ("items", "additionalProperties"):
        check_schema(value, where, enforced, depth)
    elif key in ("anyOf", "prefixItems"):
        if not isinstance(value, list) or not value:
            raise ConstraintError(f"{where} must be a non-empty list of schemas")
        for i, sub in enumerate(value):
            check_schema(sub, f"{where}[{i}]", enforced, depth)
    elif key == "format" and value not in FORMATS:
        raise UnsupportedSchema(f"{where} {value!r} is not a format constrained decoding enforces ({sorted(FORMATS)})")
    elif key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
        raise UnsupportedSchema(f"{where} {value!r}: only references inside the schema (#/$defs/...) are supported")
    elif key == "type":
        kinds = value if isinstance(value, list) else [value]
        if not kinds or any(k not in JSON_TYPES for k in kinds):
            raise ConstraintError(f"{where} {value!r} is not a JSON Schema type ({sorted(JSON_TYPES)})")


# ----- the tokenizer's table, once per tokenizer


class Vocabulary:
    """A tokenizer's ids as xgrammar sees them, with the compiler over them.

    Tokens holding a control byte other than "\\n" are left out (xgrammar treats them as specials, never allowed):
    JSON never writes those bytes raw, and xgrammar 0.2.9's length-bounded strings would otherwise accept them, which
    json.loads refuses."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        xgr = _xgrammar()
        table = _token_bytes(tokenizer)
        self.size = len(table)
        self.strips_leading_space = _strips_leading_space(tokenizer, table)
        usable = [b if b is not None and not _has_control_byte(b) else b"" for b in table]
        eos = tokenizer.eos_token_id
        info = xgr.TokenizerInfo(usable, xgr.VocabType.RAW, vocab_size=self.size,
                                 stop_token_ids=[eos] if 0 <= eos < self.size else None)
        # Compiled grammars are cached by their text, up to a bound: a client sending ever new schemas must not
        # grow the server without end.
        self.compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                            cache_limit_bytes=COMPILE_CACHE_BYTES)
        self.words = (self.size + 31) // 32  # the bitmask's 32-bit words

    def compile(self, grammar: Any) -> Any:
        try:
            return self.compiler.compile_grammar(grammar)
        except (RuntimeError, ValueError) as error:
            raise ConstraintError(f"the grammar did not compile: {_reason(error)}") from error

    @property
    def reply_start(self) -> str:
        """EBNF for what may open a reply before its text: SentencePiece decoding drops the first piece's "▁", so
        the model's natural first token ("▁{", "▁get") spells a space the reply will not show."""
        return '" "?' if self.strips_leading_space else '""'


COMPILE_CACHE_BYTES = 256 * 2**20
_VOCABULARIES: dict[int, tuple[Tokenizer, Vocabulary]] = {}
_LOCK = threading.Lock()


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """The tokenizer's Vocabulary, built on first use (the tokenizer is kept, so its id is never reused)."""
    with _LOCK:
        entry = _VOCABULARIES.get(id(tokenizer))
        if entry is None:
            entry = _VOCABULARIES[id(tokenizer)] = (tokenizer, Vocabulary(tokenizer))
        return entry[1]


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as error:
        raise Unavailable("structured output needs xgrammar: pip install xgrammar (on a CPU-only machine "
                          "`pip install --no-deps xgrammar apache-tvm-ffi transformers` avoids triton)") from error
    return xgrammar


def _token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if token_bytes is None:
        raise ConstraintError(f"{type(tokenizer).__name__} does not give its tokens' bytes (token_bytes), which "
                              "constrained decoding needs")
    return token_bytes()


def _has_control_byte(raw: bytes) -> bool:
    return any(b < 0x20 and b != 0x0A for b in raw)


def _strips_leading_space(tokenizer: Tokenizer, table: Sequence[bytes | None]) -> bool:
    """Whether decoding drops a reply's leading space (SentencePiece's dummy prefix), asked of the tokenizer."""
    probe = next((i for i, b in enumerate(table) if b and len(b) > 1 and b[:1] == b" " and b[1:2].isalpha()), None)
    return probe is not None and not tokenizer.decode([probe]).startswith(" ")


# ----- compiled grammars and per-request matchers


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar over one vocabulary; `matcher` starts a request's walk through it."""

    vocabulary: Vocabulary
    compiled: Any  # xgrammar.CompiledGrammar
    description: str  # for logs and errors: what the grammar is of

    def matcher(self, stop_ids: Sequence[int]) -> Matcher:
        return Matcher(self, stop_ids)


class Matcher:
    """One request's state in a Grammar: which tokens may come next, advanced by each sampled token."""

    def __init__(self, grammar: Grammar, stop_ids: Sequence[int]) -> None:
        xgr = _xgrammar()
        self.grammar = grammar
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self._matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=sorted(self.stop_ids))
        self._words = torch.zeros(1, grammar.vocabulary.words, dtype=torch.int32)
        self._not_stops = np.full(grammar.vocabulary.words, 0xFFFFFFFF, dtype=np.uint32)  # 1 bits: non-stop ids
        for stop in self.stop_ids:
            if stop < grammar.vocabulary.size:
                self._not_stops[stop // 32] &= ~np.uint32(1 << (stop % 32))
        self.finished = False  # nothing but an end token may follow: the reply is complete
        self._fill()

    def _fill(self) -> None:
        self._matcher.fill_next_token_bitmask(self._words)

    def bias(self, size: int) -> torch.Tensor:
        """[size] float: 0 where a token may come next, -inf elsewhere (ids past the tokenizer's, e.g. an embedding's
        padding rows, never may). Added to the logits: branch-free, ~10x cheaper than masked_fill on 151K ids."""
        bits = np.unpackbits(self._words.numpy().view(np.uint8), bitorder="little")[: self.grammar.vocabulary.size]
        if not bits.any():
            raise ConstraintError(f"the grammar ({self.grammar.description}) allows no next token")
        # float32 bit patterns without a branch: allowed (1) -> 0x00000000 = 0.0, forbidden (0) -> 0xFF800000 = -inf
        patterns = (bits.astype(np.int32) - 1) & np.int32(-8388608)
        bias = torch.from_numpy(patterns.view(np.float32))
        if size > bias.shape[0]:
            bias = torch.cat([bias, bias.new_full((size - bias.shape[0],), float("-inf"))])
        return bias[:size]

    def advance(self, token: int) -> None:
        """Take the sampled token; an end token ends the walk, any other must be one the mask allowed."""
        if token in self.stop_ids:
            self.finished = True
            return
        if not self._matcher.accept_token(int(token)):
            raise ConstraintError(f"token {token} is not allowed here by the grammar ({self.grammar.description})")
        self._fill()
        self.finished = not (self._words[0].numpy().view(np.uint32) & self._not_stops).any()


# ----- the grammars the server asks for


def json_grammar(vocab: Vocabulary, schema: Mapping[str, Any] | None, prefix: str = "") -> Grammar:
    """A JSON reply: valid against `schema`, or any JSON object when None; written compactly with json.dumps'
    separators (", " and ": ", no other whitespace), after `prefix` (a role-token family's empty metadata line)."""
    xgr = _xgrammar()
    if schema is not None:
        check_schema(schema)
    value = _json_value(xgr, schema if schema is not None else {"type": "object", "additionalProperties": True})
    head = xgr.Grammar.from_ebnf(f"root ::= {vocab.reply_start} {_literal(prefix)}")
    return Grammar(vocab, vocab.compile(xgr.Grammar.concat(head, value)), "a JSON schema" if schema else "JSON")


def tool_call_grammar(vocab: Vocabulary, tools: Sequence[Mapping[str, Any]], syntax: str) -> Grammar:
    """A call of one of `tools` (bare function schemas: name, parameters) in the family's syntax, its arguments
    valid against the tool's parameters: GLM-4's `name\\n{json}` ("json") or ChatGLM3's
    `name\\n```python\\ntool_call(k=v, ...)\\n```` ("python")."""
    xgr = _xgrammar()
    if not tools:
        raise ConstraintError("a forced tool call needs at least one tool")
    calls = [_call(xgr, vocab, tool, syntax) for tool in tools]
    grammar = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    names = ", ".join(t["name"] for t in tools)
    return Grammar(vocab, vocab.compile(grammar), f"a call of {names}")


def _call(xgr: Any, vocab: Vocabulary, tool: Mapping[str, Any], syntax: str) -> Any:
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    head = f"{vocab.reply_start} {_literal(tool['name'] + chr(10))}"
    try:
        if syntax == "json":
            check_schema(parameters, f"tool {tool['name']!r} parameters")
            return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {head}"), _json_value(xgr, parameters))
        if syntax == "python":
            rules = PythonLiteralRules(parameters, f"tool {tool['name']!r} parameters")
            body = rules.keyword_arguments(parameters)
            fence = f'"```python\\ntool_call(" {body} ")\\n```"'
            return xgr.Grammar.from_ebnf(rules.ebnf(f"{head} {fence}"))
    except (RuntimeError, ValueError) as error:
        if isinstance(error, ConstraintError):
            raise
        raise ConstraintError(f"tool {tool['name']!r}: its parameters did not compile to a grammar: "
                              f"{_reason(error)}") from error
    raise ConstraintError(f"this chat format writes no tool calls (syntax {syntax!r})")


def _json_value(xgr: Any, schema: Mapping[str, Any]) -> Any:
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "),
                                            strict_mode=True)
    except (RuntimeError, ValueError) as error:
        raise ConstraintError(f"the JSON schema did not compile to a grammar: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    """xgrammar's message without its log prefix ("[21:59:49] /project/cpp/regex_converter.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip())


def _literal(text: str) -> str:
    """An EBNF string literal (xgrammar reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


# ----- ChatGLM3: arguments as Python literals


PYTHON_ENFORCED = frozenset({"type", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "properties",
                             "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
                             "maxLength"})
_PYTHON_BASE = {
    # A JSON string without \\u and \\/ escapes: then it is also a Python literal of the same value.
    "py_char": r'[^"\\\0-\x1f] | "\\" ["\\bfnrt]',
    "py_string": r'"\"" py_char* "\""',
    "py_integer": r'"-"? ("0" | [1-9] [0-9]*)',
    "py_number": r'py_integer ("." [0-9]+)? ([eE] [+\-]? [0-9]+)?',
    "py_boolean": '"True" | "False"',
    "py_none": '"None"',
    "py_list": '"[" (py_any (", " py_any)*)? "]"',
    "py_dict": '"{" (py_string ": " py_any (", " py_string ": " py_any)*)? "}"',
    "py_any": "py_string | py_number | py_boolean | py_none | py_list | py_dict",
}


class PythonLiteralRules:
    """EBNF for values written as Python literals, by JSON Schema: what ChatGLM3's `tool_call(k=v, ...)` arguments
    are (glmkit.text.tool_calls parses them with ast.literal_eval). Objects take only their declared properties
    (in order, the required ones always), strings no \\u escapes; a keyword outside PYTHON_ENFORCED is refused."""

    def __init__(self, root: Mapping[str, Any], where: str) -> None:
        check_schema(root, where, PYTHON_ENFORCED)
        self.root, self.where = root, where
        self.rules: dict[str, str] = dict(_PYTHON_BASE)
        self._count = 0

    def ebnf(self, root: str) -> str:
        return "\n".join([f"root ::= {root}", *(f"{name} ::= {body}" for name, body in self.rules.items())])

    def _rule(self, body: str) -> str:
        self._count += 1
        name = f"py_{self._count}"
        self.rules[name] = body
        return name

    def value(self, schema: Any) -> str:
        """An EBNF expression for the Python literals `schema` allows."""
        if schema is True or schema == {} or (isinstance(schema, Mapping) and set(schema) <= ANNOTATIONS):
            return "py_any"
        if schema is False:
            raise ConstraintError(f"{self.where}: a schema of false allows no value")
        if "$ref" in schema:
            return self._reference(schema["$ref"])
        if "const" in schema:
            return _literal(python_literal(schema["const"]))
        if "enum" in schema:
            return self._rule(" | ".join(_literal(python_literal(v)) for v in schema["enum"]))
        if "anyOf" in schema:
            if set(schema) - ANNOTATIONS - {"anyOf", "$defs", "definitions"}:
                raise UnsupportedSchema(f"{self.where}: anyOf beside other keywords is not supported in ChatGLM3 tool "
                                      "calls; move them into each branch")
            return self._rule(" | ".join(self.value(s) for s in schema["anyOf"]))
        kinds = schema.get("type")
        if kinds is None:
            return "py_any"
        if isinstance(kinds, list):
            return self._rule(" | ".join(self._typed(schema, k) for k in kinds))
        return self._typed(schema, kinds)

    def _typed(self, schema: Mapping[str, Any], kind: str) -> str:
        if kind == "string":
            low, high = schema.get("minLength", 0), schema.get("maxLength")
            if not low and high is None:
                return "py_string"
            return self._rule(f'"\\"" py_char{_repeat(low, high)} "\\""')
        if kind == "array":
            return self._array(schema)
        if kind == "object":
            return self._object(schema)
        return {"integer": "py_integer", "number": "py_number", "boolean": "py_boolean", "null": "py_none"}[kind]

    def _array(self, schema: Mapping[str, Any]) -> str:
        item = self.value(schema.get("items", True))
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if high == 0:
            return '"[]"'
        more = f'(", " {item}){_repeat(max(low - 1, 0), None if high is None else high - 1)}'
        return self._rule(f'"[" {item} {more} "]"' if low else f'"[" ({item} {more})? "]"')

    def _object(self, schema: Mapping[str, Any]) -> str:
        properties = schema.get("properties")
        if not properties:
            return "py_dict" if schema.get("additionalProperties", True) is not False else '"{}"'
        members = [(f"{_literal(python_literal(name))} \": \"", self.value(sub)) for name, sub in properties.items()]
        return self._rule(f'"{{" {self._members(members, schema.get("required", []), list(properties))} "}}"')

    def keyword_arguments(self, schema: Mapping[str, Any]) -> str:
        """`k=v, ...` for a tool's parameters (an object schema; names must be Python identifiers)."""
        properties = schema.get("properties") or {}
        for name in properties:
            if not name.isidentifier():
                raise ConstraintError(f"{self.where}: {name!r} is not a Python identifier, so ChatGLM3 cannot pass it "
                                      "as tool_call(name=...)")
        members = [(_literal(f"{name}="), self.value(sub)) for name, sub in properties.items()]
        return self._members(members, schema.get("required", []), list(properties))

    def _members(self, members: list[tuple[str, str]], required: Sequence[str], names: list[str]) -> str:
        """Members in order, ", "-separated, each optional unless required. Two rule chains: `first_i` (members i..
        with none written yet) and `rest_i` (members i.. after one was written), so separators never dangle."""
        first, rest = '""', '""'
        for (key, value), name in zip(reversed(members), reversed(names), strict=True):
            member = f"{key} {value}"
            if name in required:
                first, rest = self._rule(f"{member} {rest}"), self._rule(f'", " {member} {rest}')
            else:
                first = self._rule(f"{member} {rest} | {first}")
                rest = self._rule(f'(", " {member})? {rest}')
        return first

    def _reference(self, ref: str) -> str:
        parts = ref.lstrip("#/").split("/")
        if len(parts) != 2 or parts[0] not in ("$defs", "definitions"):
            raise UnsupportedSchema(f"{self.where}: reference {ref!r} is not #/$defs/NAME or #/definitions/NAME")
        target = self.root.get(parts[0], {}).get(parts[1])
        if target is None:
            raise ConstraintError(f"{self.where}: reference {ref!r} points to nothing")
        name = f"py_def_{''.join(c if c.isalnum() else '_' for c in parts[1])}"
        if name not in self.rules:
            self.rules[name] = '""'  # reserved first, so a recursive reference finds it
            self.rules[name] = self.value(target)
        return name


def _repeat(low: int, high: int | None) -> str:
    """EBNF's repetition bounds: {low,high}, or {low,} without an upper one."""
    return f"{{{low},{'' if high is None else high}}}"
