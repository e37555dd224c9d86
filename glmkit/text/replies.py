"""`tokenizer.parse_response(text, tools=None)` on every tokenizer: the raw reply as an OpenAI-shape message.

Why on the tokenizer: the chat format travels with the tokenizer (glmkit.text.formats), so the tokenizer is what a
caller holds when it has a reply to read. Each tokenizer class names its format (`reply_format`), the same one
`chat_format_for` picks for it (a test checks that they agree).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class ParsesReplies:
    """Mixed into each tokenizer class: reply parsing by the tokenizer's chat format."""

    reply_format: ClassVar[Any]  # the class's ChatFormat

    def parse_response(self, text: str, tools: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """{"role": "assistant", "content", ["tool_calls"]} for a raw reply. tools=None: the calls the official
        process_response parses (ChatGLM3 `tool_call(...)`, GLM-4 `name\\n{json}`); a list: calls to those tools
        only. A malformed call comes back as text content; ChatGLM-6B/ChatGLM2 replies are always text."""
        return self.reply_format.parse_response(text, tools)
