"""Request and response shapes of the OpenAI-compatible API (the subset glmkit serves).

Every value is checked here, at the edge, so that nothing a client sends can make the engine's step fail:
numbers are finite and in range (a temperature or top_p so small that fp32 sampling breaks is refused),
a seed is a 64-bit integer, and strings hold no lone surrogates (they cannot be encoded to UTF-8).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glmkit.text.tool_calls import ToolSchemaError, check_json_schema

# The smallest sampling temperature and top_p accepted. Below these fp32 sampling breaks down: logits divided
# by a temperature under ~1e-38 overflow to inf, and a top_p under ~1e-45 rounds to 0 in fp32 and filters out
# every token. Any value this small means "the most likely token", which temperature 0 (greedy) asks for.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs (the engine's too)
TEMPERATURE_SCHEMA = {"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]}


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """The location of the first string holding a lone surrogate (U+D800..U+DFFF), if any."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _surrogate_path(key) is not None:
            return f"{path}.{key}".lstrip(".")
        if (found := _surrogate_path(item, f"{path}.{key}".lstrip("."))) is not None:
            return found
    return None


class Checked(BaseModel):
    """Finite floats only, and no lone surrogates anywhere in the request."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        if (where := _surrogate_path(data)) is not None:
            raise ValueError(f"{where or 'the body'} holds a lone surrogate (a \\ud800-\\udfff escape without its "
                             "pair), which is not valid Unicode text")
        return data


class TextPart(Checked):
    """One part of OpenAI's list form of a message's content; only text parts are served."""

    type: Literal["text"]
    text: str


class CallFunction(Checked):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, in a string")


class ToolCall(Checked):
    """An assistant message's tool call, as the client sends it back in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CallFunction


class Message(Checked):
    """A message; `tool` messages carry a tool's result (`tool_call_id` names the call), assistant messages may
    carry `tool_calls` instead of content."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with tool_calls may "
                             "leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") not in ("text", None):
                    raise ValueError(f"content parts of type {part.get('type')!r} are not supported; this server "
                                     "serves text parts only ({'type': 'text', 'text': ...})")
        return value

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as other OpenAI-compatible servers do)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def for_format(self) -> dict[str, Any]:
        """The message as the chat formats take it (OpenAI's shape, content as one string)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text if self.content is not None else None}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(Checked):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _json_schema(cls, value: dict[str, Any] | None, info) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_json_schema(value, "parameters")
            except ToolSchemaError as e:
                raise ValueError(f"{e} (function {info.data.get('name')!r}); it must be a JSON Schema") from e
        return value


class Tool(Checked):
    type: Literal["function"]
    function: FunctionDefinition

    def for_format(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class ChosenFunction(Checked):
    name: str


class NamedToolChoice(Checked):
    type: Literal["function"]
    function: ChosenFunction


class JSONSchemaFormat(Checked):
    """response_format's json_schema: the reply is JSON valid against `schema` (enforced whatever `strict` says)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON Schema")
    strict: bool | None = None


class ResponseFormat(Checked):
    """text (the default), json_object (any JSON object) or json_schema; both JSON kinds are enforced by
    constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type 'json_schema' (and only with it): "
                             '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
        return self

    def json_schema_or_none(self) -> dict[str, Any] | None:
        """The schema to enforce (None: any JSON object); only for the JSON kinds."""
        return self.json_schema.schema_ if self.json_schema is not None else None


class StreamOptions(Checked):
    include_usage: bool = False


class SamplingChecks(Checked):
    """What both APIs' sampling values must be beyond their ranges: a value the sampler cannot represent is a
    400 naming the field, never a failed engine step."""

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}; a smaller one means the "
                             "most likely token, which temperature 0 gives")
        return value

    @field_validator("top_p", check_fields=False)
    @classmethod
    def _top_p(cls, value: float) -> float:
        if value < MIN_TOP_P:
            raise ValueError(f"top_p must be at least {MIN_TOP_P} (values smaller than that cannot be represented "
                             "when sampling); use temperature 0 for the most likely token")
        return value


class SamplingFields(SamplingChecks):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0, description=f"0 means greedy; else in [{MIN_TEMPERATURE}, 2]",
                               json_schema_extra=TEMPERATURE_SCHEMA)
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="a 64-bit signed integer")
    stream: bool = False
    user: str | None = None
    n: int = Field(1, ge=1, le=16)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted only at their no-op values: a request that needs them is refused (`unsupported`), not
    # silently answered without them.
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first option this server cannot honour, if any."""
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        return "logit_bias" if self.logit_bias else None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def choice_seed(self, choice: int) -> int | None:
        """Choice i samples with seed + i, wrapped into the 64-bit range (so seed 2**63 - 1 with n = 2 works)."""
        if self.seed is None:
            return None
        return (self.seed + choice - INT64_MIN) % 2**64 + INT64_MIN


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprob_count(self) -> int | None:
        """None (no logprobs) or how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token (0: none)")
    echo: bool = False

    def logprob_count(self) -> int | None:
        return self.logprobs


class LegacyRequest(SamplingChecks):
    """The original ChatGLM-6B api.py request; max_length is prompt + answer, at most the model's context
    (the default)."""

    prompt: str
    history: list[tuple[str, str]] = Field(default_factory=list)
    max_length: int | None = Field(None, ge=1)
    top_p: float = Field(0.7, ge=MIN_TOP_P, le=1.0)
    temperature: float = Field(0.95, ge=0.0, le=2.0, json_schema_extra=TEMPERATURE_SCHEMA)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, which every 4xx and 5xx of this server carries."""

    error: ErrorDetail
