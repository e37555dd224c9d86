"""OpenAI-style conversations as the role-token families (ChatGLM3, GLM-4) write them: one message per role turn.

Why one normaliser: ChatGLM3 and GLM-4 both know exactly four roles (system, user, assistant, observation), put a
tool call in an assistant message whose metadata is the tool name, and return tool results as observations. The
server and fine-tuning send OpenAI messages (`tool`/`function` roles, `tool_calls`); this turns them into the
family's own messages, with only the way arguments are written left to the family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from glmkit.text.chat_format import ChatFormatError, History, Message
from glmkit.text.tool_calls import ToolSchemaError, call_arguments

ROLES = ("system", "user", "assistant", "observation")
_ALIASES = {"tool": "observation", "function": "observation"}

WriteCall = Callable[[str, dict[str, Any]], str]  # (name, arguments) -> the assistant content of the call


def role_messages(messages: Sequence[Message], write_call: WriteCall) -> list[dict[str, Any]]:
    """The family's messages ({"role", "content", "metadata"[, "tools"]}) for OpenAI-style `messages`.

    Errors (ChatFormatError) for an unknown role, content that is not text, or an observation that does not
    follow an assistant turn (the model only ever sees results right after its call)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = _ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise ChatFormatError(f"unknown role {message.get('role')!r}: use one of {[*ROLES, *_ALIASES]}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatFormatError(f"a {role} message's content must be text, got {type(content).__name__}")
        if role == "observation" and (not out or out[-1]["role"] not in ("assistant", "observation")):
            raise ChatFormatError("an observation (tool result) must follow the assistant's tool call")
        try:
            calls = call_arguments(message) if role == "assistant" else []
        except ToolSchemaError as error:
            raise ChatFormatError(str(error)) from error
        if content or not calls:
            item = {"role": role, "metadata": message.get("metadata", "") or "", "content": content or ""}
            if "tools" in message:
                item["tools"] = message["tools"]
            out.append(item)
        out += [{"role": "assistant", "metadata": name, "content": write_call(name, args)} for name, args in calls]
    return out


def history_messages(query: str, history: History | Sequence[Mapping[str, Any]], system: str = "",
                     role: str = "user") -> list[dict[str, Any]]:
    """OpenAI-style messages for chat(query, history): history as (query, reply) pairs or as message dicts."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for item in history:
        if isinstance(item, Mapping):
            messages.append(dict(item))
        else:
            past_query, reply = item
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": reply}]
    return [*messages, {"role": role, "content": query}]
