"""ChatGLM3-6B's chat format: role tokens, a system prompt with tools, observation turns, `tool_call(...)` calls.

Why prompts are ids here: ChatGLM3's role tokens cannot be produced from text (by design, pitfall 16), and each
message part is its own SentencePiece call (pitfall 17), so the prompt exists only as ids built message by
message with the tokenizer's `build_single_message`. `prompt`/`render` (text) therefore refuse; `render_text` is
a view for people, never for encoding.

The model writes a call as `name\\n```python\\ntool_call(k=v, ...)\\n```` and stops at `<|observation|>`; the
official `process_response` `eval`s that line. Here it is parsed with `ast` (glmkit.text.tool_calls).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from glmkit.text.chat_format import ChatFormatError, History, Message
from glmkit.text.protocol import Tokenizer
from glmkit.text.role_messages import history_messages, role_messages
from glmkit.text.tool_calls import (
    ToolSchema,
    ToolSchemaError,
    assistant_message,
    function_schema,
    openai_tool_call,
    parse_tool_call_code,
    split_segments,
    strip_code_fence,
    tool_names,
)

TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
INTERPRETER = "interpreter"


def python_literal(value: Any) -> str:
    """`value` (decoded JSON) as a Python literal, the way a `tool_call(...)` argument is written."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(str(k))}: {python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The assistant content of a call, as the model writes it (and process_response stores it)."""
    if not all(isinstance(k, str) and k.isidentifier() for k in arguments):
        raise ChatFormatError(f"tool call {name!r}: argument names must be Python identifiers, got {list(arguments)}")
    args = ", ".join(f"{k}={python_literal(v)}" for k, v in arguments.items())
    return f"```python\ntool_call({args})\n```"


def _clean(text: str) -> str:
    return text.strip().replace("[[训练时间]]", "2023年")


@dataclass(frozen=True)
class ChatGLM3Format:
    name: str = "chatglm3"
    has_roles: ClassVar[bool] = True
    answer_prefix: ClassVar[str] = "\n"  # the empty metadata line of a plain answer
    call_syntax: ClassVar[str | None] = "python"  # name\n```python\ntool_call(k=v, ...)\n```

    # ----- the conversation as ChatGLM3 messages

    def messages(self, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None) -> list[dict[str, Any]]:
        """ChatGLM3's history list for OpenAI-style `messages`: with `tools`, a first system message carrying the
        bare function schemas (as the official OpenAI demo puts it; the user's own system message stays where it
        is); `tool`/`function` roles become observations, `tool_calls` become assistant messages named by tool."""
        try:
            schemas = [function_schema(t) for t in tools] if tools else []
        except ToolSchemaError as error:
            raise ChatFormatError(str(error)) from error
        head = [{"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": schemas}] if schemas else []
        return role_messages([*head, *messages], write_tool_call)

    @staticmethod
    def message_content(item: Mapping[str, Any]) -> str:
        """A message's content as the model sees it: a system message with tools gets the indented JSON list."""
        content = item.get("content") or ""
        if item["role"] == "system" and "tools" in item:
            content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
        return content

    # ----- prompts

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        raise ChatFormatError("ChatGLM3's role tokens cannot come from text: use prompt_ids (render_text to look at it)")

    def render(self, messages: Sequence[Message]) -> str:
        raise ChatFormatError("ChatGLM3's role tokens cannot come from text: use render_ids (render_text to look at it)")

    def render_text(self, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt as text, for logs and people; encoding this string gives the wrong ids."""
        body = "".join(f"<|{m['role']}|>{m['metadata']}\n{self.message_content(m)}" for m in self.messages(messages, tools))
        return "[gMASK]sop" + body + ("<|assistant|>" if add_generation_prompt else "")

    def render_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        """`[gMASK] sop`, each message by `build_single_message`, then `<|assistant|>`: build_chat_input's ids."""
        build = getattr(tokenizer, "build_single_message", None)
        if build is None:
            raise ChatFormatError(f"ChatGLM3 prompts need ChatGLM3's tokenizer (build_single_message), not "
                                  f"{type(tokenizer).__name__}")
        ids = [tokenizer.convert_tokens_to_ids("[gMASK]"), tokenizer.convert_tokens_to_ids("sop")]
        for item in self.messages(messages, tools):
            ids += build(item["role"], item["metadata"], self.message_content(item))
        if add_generation_prompt:
            ids.append(tokenizer.convert_tokens_to_ids("<|assistant|>"))
        return ids

    def prompt_ids(self, tokenizer: Tokenizer, query: str, history: History | Sequence[Mapping[str, Any]] = (),
                   system: str = "", role: str = "user") -> list[int]:
        """chat(query, history, role)'s prompt: equal to `tokenizer.build_chat_input(query, history, role)`."""
        return self.render_ids(tokenizer, history_messages(query, history, system, role))

    def followup_ids(self, tokenizer: Tokenizer, query: str, role: str = "user") -> list[int]:
        """The ids fed after a reused KV cache: the new message alone through build_chat_input, which writes
        `[gMASK] sop` again mid-sequence, as the official stream_chat with past_key_values does."""
        return self.render_ids(tokenizer, [{"role": role, "content": query}])

    # ----- stopping and sampling

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """eos and `<|user|>`, `<|observation|>`: config.json lists only eos (pitfall 15)."""
        return (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>"),
                tokenizer.convert_tokens_to_ids("<|observation|>"))

    def sampling_ids(self, tokenizer: Tokenizer) -> dict[str, object]:
        return {"eos_token_ids": self.stop_ids(tokenizer), "invalid_score_token_id": 5}

    # ----- replies

    def parse(self, reply: str) -> str:
        """The text a user sees: the last segment, its content when it has no metadata (stripped, the training
        date filled in), else the segment as the model wrote it (a call or code, not run)."""
        metadata, content = split_segments(reply)[-1]
        return _clean(content) if not metadata.strip() else f"{metadata.strip()}\n{content}".strip()

    def process_response(self, output: str, history: list[dict[str, Any]]) -> tuple[str | dict[str, Any], list]:
        """The official modeling `process_response`: one history entry per segment; returns the last segment as
        text, or {"name", "parameters"} for a call when history[0] carries tools, else {"name", "content"}. A call
        that does not parse (positional arguments, code that is not `tool_call(...)`) comes back as its text
        instead of raising (the official code would raise, or run the code)."""
        history = list(history)
        has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
        response: str | dict[str, Any] = ""
        for metadata, content in split_segments(output):
            if not metadata.strip():
                history.append({"role": "assistant", "metadata": metadata, "content": content.strip()})
                response = _clean(content)
                continue
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            name = metadata.strip()
            if not has_tools:
                response = {"name": name, "content": content}
                continue
            code = strip_code_fence(content)
            arguments = None if code is None else parse_tool_call_code(code)
            response = {"name": name, "parameters": arguments} if arguments is not None else f"{name}\n{content}".strip()
        return response, history

    def parse_response(self, text: str, tools: Sequence[ToolSchema] | None = None) -> dict[str, Any]:
        """An OpenAI-shape assistant message. The last segment is a call when it has a name and its content is a
        fenced `tool_call(...)` with literal keyword arguments; with `tools`, the name must be one of them.
        Anything else, the interpreter's code included, is text content. Earlier plain segments are the content
        of a message that also carries the call."""
        segments = split_segments(text)
        metadata, content = segments[-1]
        name = metadata.strip()
        allowed = tool_names(tools)
        code = strip_code_fence(content) if name and name != INTERPRETER else None
        arguments = None if code is None else parse_tool_call_code(code)
        if arguments is None or (allowed is not None and name not in allowed):
            return assistant_message(self.parse(text))
        before = "\n".join(_clean(c) for m, c in segments[:-1] if not m.strip() and c.strip())
        return assistant_message(before or None, [openai_tool_call(name, arguments)])


CHATGLM3 = ChatGLM3Format()
