"""GLM-4's chat format (glm-4-9b-chat, the -hf and 0414 repos): the repo's Jinja template over role messages.

Why the template and not hand-written strings: GLM-4's format is defined by the `chat_template` its tokenizer
ships (tools in a system turn, calls written `name\\n{json}`, results under `<|observation|>`), and GLM-4's
specials *are* matched in text, so rendering the template and encoding it gives the official ids. A tokenizer's
own template wins (0414 differs from 9b-chat); glmkit's transcription of glm-4-9b-chat's is the default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from glmkit.models.positions import SpecialIds
from glmkit.text.chat_format import ChatFormatError, History, Message
from glmkit.text.chat_template import GLM4_CHAT_TEMPLATE, render_template
from glmkit.text.protocol import Tokenizer
from glmkit.text.role_messages import history_messages, role_messages
from glmkit.text.tool_calls import (
    ToolSchema,
    ToolSchemaError,
    assistant_message,
    function_schema,
    openai_tool_call,
    split_segments,
    tool_names,
)

BUILTIN_TOOLS = ("python", "simple_browser", "cogview")
_SEARCH = re.compile(r'search\("(.+?)"\s*,\s*recency_days\s*=\s*(\d+)\)')


class GLM4PromptIds:
    """The ids GLM-4 prompts are built from, for a tokenizer that knows its specials by name (`special_tokens`):
    the tiktoken one (glm-4-9b-chat) and the `tokenizer.json` one (-hf, 0414) alike."""

    special_tokens: dict[str, int]
    pad_token_id: int

    @property
    def special_ids(self) -> SpecialIds:
        s = self.special_tokens
        return SpecialIds(bos=s["<sop>"], mask=s["[MASK]"], gmask=s["[gMASK]"], pad=self.pad_token_id)

    @property
    def prefix_ids(self) -> list[int]:
        """`[gMASK] <sop>`: the start of every prompt."""
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]


def write_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The assistant content of a call (its metadata is the name): the JSON arguments, non-ASCII kept."""
    return json.dumps(dict(arguments), ensure_ascii=False)


def template_tools(tools: Sequence[ToolSchema]) -> list[dict[str, Any]]:
    """Tools in the shape GLM-4's templates read: {"type": "function", "function": {...}}, or a built-in type."""
    out = []
    for tool in tools:
        if isinstance(tool, Mapping) and tool.get("type") in BUILTIN_TOOLS:
            out.append({"type": tool["type"]})
            continue
        try:
            out.append({"type": "function", "function": function_schema(tool)})
        except ToolSchemaError as error:
            raise ChatFormatError(str(error)) from error
    return out


@dataclass(frozen=True)
class GLM4Format:
    name: str = "glm4"
    has_roles: ClassVar[bool] = True
    template: str = GLM4_CHAT_TEMPLATE
    answer_prefix: ClassVar[str] = "\n"  # the empty metadata line of a plain answer
    call_syntax: ClassVar[str | None] = "json"  # name\n{json arguments}

    def messages(self, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None) -> list[dict[str, Any]]:
        """GLM-4's messages: with `tools`, the tools ride on the first system message (the template writes the
        tools block and then that message's own content), or on a new first system message without content;
        `tool` roles become observations and `tool_calls` assistant messages {metadata: name, content: JSON}."""
        items = role_messages(messages, write_tool_call)
        if tools:
            wrapped = template_tools(tools)
            system = next((m for m in items if m["role"] == "system"), None)
            if system is None:
                items.insert(0, {"role": "system", "metadata": "", "content": None, "tools": wrapped})
            else:
                system["tools"] = wrapped
        return items

    def _template(self, tokenizer: Tokenizer | None) -> str:
        return getattr(tokenizer, "chat_template", None) or self.template

    def render_text(self, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                    add_generation_prompt: bool = True, tokenizer: Tokenizer | None = None) -> str:
        """The prompt text by the tokenizer's template (or the default); `tools` also go to the template's global
        `tools` (what the 0414 templates read)."""
        wrapped = template_tools(tools) if tools else None
        return render_template(self._template(tokenizer), self.messages(messages, tools), wrapped, add_generation_prompt)

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        return self.render_text(history_messages(query, history, system))

    def render(self, messages: Sequence[Message]) -> str:
        return self.render_text(messages)

    def render_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        """The template's text encoded without added specials: it writes `[gMASK]<sop>` itself (pitfall 21)."""
        return tokenizer.encode(self.render_text(messages, tools, add_generation_prompt, tokenizer),
                                add_special_tokens=False)

    def prompt_ids(self, tokenizer: Tokenizer, query: str, history: History | Sequence[Mapping[str, Any]] = (),
                   system: str = "", role: str = "user") -> list[int]:
        return self.render_ids(tokenizer, history_messages(query, history, system, role))

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """`<|endoftext|>`, `<|user|>`, `<|observation|>` (151329, 151336, 151338 in the real vocabulary)."""
        return tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))

    def sampling_ids(self, tokenizer: Tokenizer) -> dict[str, object]:
        # GLM-4's InvalidScoreLogitsProcessor forces id 198, the "\n" token.
        return {"eos_token_ids": self.stop_ids(tokenizer),
                "invalid_score_token_id": tokenizer.encode("\n", add_special_tokens=False)[0]}

    # ----- replies

    def parse(self, reply: str) -> str:
        """The text a user sees: the last `<|assistant|>` segment, stripped (plain answers start with "\\n")."""
        metadata, content = split_segments(reply)[-1]
        return content.strip() if not metadata.strip() else f"{metadata.strip()}\n{content}".strip()

    def process_response(self, output: str, history: list[dict[str, Any]]) -> tuple[str | dict[str, Any], list]:
        """The official modeling `process_response`: per segment a history entry; the last segment as text, as
        {"name", "parameters"} (JSON arguments) when history[0] carries tools, else {"name", "content"}. Arguments
        that are not a JSON object come back as text (the official code raises JSONDecodeError)."""
        history = list(history)
        has_tools = bool(history) and "tools" in history[0]
        response: str | dict[str, Any] = ""
        for metadata, content in split_segments(output):
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            name = metadata.strip()
            if not name:
                response = content.strip()
            elif not has_tools:
                response = {"name": name, "content": content}
            else:
                arguments = _json_object(content)
                response = {"name": name, "parameters": arguments} if arguments is not None else f"{name}\n{content}".strip()
        return response, history

    def parse_response(self, text: str, tools: Sequence[ToolSchema] | None = None) -> dict[str, Any]:
        """An OpenAI-shape assistant message by the official OpenAI server's rule: the reply (its last segment) is a
        call when it has two or more lines and the second starts with "{"; the name is the first line; the rest must
        be a JSON object. With `tools` the name must be one of them (built-ins by type: `cogview` takes its text as
        {"prompt"}, `simple_browser` a `search("…", recency_days=N)`). Anything else is text content."""
        metadata, content = split_segments(text)[-1]
        reply = f"{metadata}\n{content}" if metadata else content
        lines = reply.strip().split("\n")
        allowed = tool_names(tools)
        if len(lines) < 2 or not lines[1].lstrip().startswith("{"):
            return assistant_message(reply.strip())
        name, raw = lines[0].strip(), "\n".join(lines[1:]).strip()
        if allowed is not None and name not in allowed:
            return assistant_message(reply.strip())
        arguments = _json_object(raw)
        if arguments is None and name == "cogview":
            arguments = {"prompt": raw}
        elif arguments is None and name == "simple_browser" and (match := _SEARCH.search(raw)):
            arguments = {"query": match.group(1), "recency_days": int(match.group(2))}
        if arguments is None or not name:
            return assistant_message(reply.strip())
        return assistant_message(None, [openai_tool_call(name, arguments)])


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


GLM4 = GLM4Format()
