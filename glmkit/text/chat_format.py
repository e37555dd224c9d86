"""Chat formats: how a family writes a conversation as one prompt, and reads the model's reply back.

One object per format, used by chat, the server, fine-tuning, the demo recipe and evaluation, so a
model is served exactly as it was trained. ChatGLM-6B's is the official one:

    [Round 0]\\n问：{q0}\\n答：{r0}\\n[Round 1]\\n问：{query}\\n答：      (the first turn is the bare query)

It has no system role: system text goes in front of the first user message. ChatGLM2's (`CHATGLM2`) is the
same idea with 1-based rounds and blank lines. ChatGLM3's and GLM-4's role-token formats live in
`glmkit.text.chatglm3_format` and `glmkit.text.glm4_format`.

Beyond text prompts, every format gives the prompt as ids (`prompt_ids`, `render_ids`: ChatGLM3's role tokens
cannot come from text, so callers must take ids from the format, never encode a rendered string themselves),
its stop ids, and the reply as an OpenAI-shape assistant message (`parse_response`, with tool calls where the
family has them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from glmkit.text.protocol import Tokenizer
from glmkit.text.tool_calls import ToolSchema, assistant_message

Message = Mapping[str, Any]  # {"role": "system" | "user" | "assistant", "content": ...}, as OpenAI's API sends
History = Sequence[tuple[str, str]]  # (query, response) pairs, as ChatGLM's chat() takes

_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


class ChatFormatError(ValueError):
    """A conversation the format cannot write (the roles are out of order, the last turn is not the user's)."""


class ChatFormat(Protocol):
    name: str
    # Role messages (ChatGLM3, GLM-4): `role=` in chat, dict history, the official process_response(output, history).
    has_roles: ClassVar[bool]
    # How a reply is laid out, for grammars that constrain one (glmkit.generation.constraints): what a plain answer
    # starts with ("\n" after ChatGLM3's and GLM-4's empty metadata line), and how a tool call is written:
    # None (no tools), "json" (GLM-4: `name\n{json}`), "python" (ChatGLM3: `name\n```python\ntool_call(k=v)\n````).
    answer_prefix: str
    call_syntax: str | None

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        """The prompt for answering `query` after `history`."""
        ...

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for answering the last (user) message of an OpenAI-style conversation."""
        ...

    def parse(self, reply: str) -> str:
        """The model's raw reply as the user should see it."""
        ...

    def sampling_ids(self, tokenizer: Tokenizer) -> dict[str, object]:
        """The token ids a chat reply is sampled with: its end tokens, and any the format bans."""
        ...

    def prompt_ids(self, tokenizer: Tokenizer, query: str, history: History = (), system: str = "") -> list[int]:
        """The ids of `prompt(query, history, system)`, prefix included: what the model is fed."""
        ...

    def render_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        """The ids of an OpenAI-style conversation (with `tools` where the family has them), prefix included."""
        ...

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """The ids that end a reply (eos, and the role tokens where the family has them)."""
        ...

    def parse_response(self, text: str, tools: Sequence[ToolSchema] | None = None) -> dict[str, Any]:
        """The raw reply as an OpenAI-shape assistant message: {"role", "content"[, "tool_calls"]}; never raises
        on model output (a malformed call comes back as text content)."""
        ...


def conversation(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]], str]:
    """(system text, (query, reply) pairs, last query) of a round-based conversation, checked: system messages
    anywhere, then user/assistant alternating, ending with a non-empty user message."""
    roles = {m.get("role") for m in messages} - {"system", "user", "assistant"}
    if roles:
        raise ChatFormatError(f"unknown role(s) {sorted(map(str, roles))}: this format knows system, user, assistant")
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ChatFormatError("the last message must come from the user")
    expected = ["user", "assistant"] * len(turns)
    if [m["role"] for m in turns] != expected[: len(turns)]:
        raise ChatFormatError("messages must alternate user, assistant, user, ... (after any system messages)")
    if not turns[-1]["content"].strip():
        raise ChatFormatError("the last user message is empty")
    contents = [m["content"] for m in turns]
    return system, list(zip(contents[0:-1:2], contents[1:-1:2], strict=True)), contents[-1]


class RoundsFormat:
    """What the round-based formats (ChatGLM-6B, ChatGLM2) share: a text prompt encoded by the tokenizer (which
    adds the prefix), end at eos only, no tools."""

    name: str
    has_roles: ClassVar[bool] = False
    answer_prefix: ClassVar[str] = ""
    call_syntax: ClassVar[str | None] = None

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        raise NotImplementedError

    def render(self, messages: Sequence[Message]) -> str:
        system, history, query = conversation(messages)
        return self.prompt(query, history, system)

    def parse(self, reply: str) -> str:
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Tokenizer, query: str, history: History = (), system: str = "") -> list[int]:
        return tokenizer.encode(self.prompt(query, history, system))

    def render_ids(self, tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[ToolSchema] | None = None,
                   add_generation_prompt: bool = True) -> list[int]:
        if tools:
            raise ChatFormatError(f"{self.name} has no tool calls: use ChatGLM3 or GLM-4 for tools")
        if not add_generation_prompt:
            raise ChatFormatError(f"{self.name}'s prompt always ends with the answer cue 答：")
        return tokenizer.encode(self.render(messages))

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return (tokenizer.eos_token_id,)

    def parse_response(self, text: str, tools: Sequence[ToolSchema] | None = None) -> dict[str, Any]:
        """Plain text only (these models have no tool calls, whatever `tools` says)."""
        return assistant_message(self.parse(text))

    @staticmethod
    def with_system(system: str, first_query: str) -> str:
        """No system role: system text goes in front of the first user message (the one rule for the server
        and for fine-tuning data, so a model is served as it was trained)."""
        return f"{system}\n\n{first_query}" if system else first_query


@dataclass(frozen=True)
class ChatGLM6BFormat(RoundsFormat):
    name: str = "chatglm-6b"

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        if not history:
            return self.with_system(system, query)
        (first_query, first_reply), *rest = history
        history = [(self.with_system(system, first_query), first_reply), *rest]
        rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return f"{rounds}[Round {len(history)}]\n问：{query}\n答："

    def parse(self, reply: str) -> str:
        """The official clean-up: the tokenizer normalises full-width punctuation to ASCII, so the model
        writes ASCII; put it back to full width where it touches a Chinese character."""
        text = reply.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full in _FULL_WIDTH.items():
            mark = re.escape(ascii_mark)
            text = re.sub(rf"([{_CJK}]){mark}", rf"\1{full}", text)
            text = re.sub(rf"{mark}([{_CJK}])", rf"{full}\1", text)
        return text

    def sampling_ids(self, tokenizer: Tokenizer) -> dict[str, object]:
        # The official InvalidScoreLogitsProcessor: the bare "▁" piece is never sampled in a chat reply.
        return {"eos_token_ids": (tokenizer.eos_token_id,),
                "invalid_score_token_id": tokenizer.convert_tokens_to_ids("▁")}


CHATGLM_6B = ChatGLM6BFormat()


@dataclass(frozen=True)
class ChatGLM2Format(RoundsFormat):
    """ChatGLM2-6B's `build_prompt`: every turn wrapped, rounds from 1, blank lines around 问/答 (spec 4.1)."""

    name: str = "chatglm2"

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        if history:
            (first_query, first_reply), *rest = history
            history = [(self.with_system(system, first_query), first_reply), *rest]
        else:
            query = self.with_system(system, query)
        rounds = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
        return f"{rounds}[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def followup_ids(self, tokenizer: Tokenizer, query: str, history: History) -> list[int]:
        """The ids to feed after a reused KV cache of `history`: "\\n\\n[Round n]..." without specials and
        without its first token (the dummy "▁"), as the official stream_chat with past_key_values."""
        return tokenizer.encode(f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答：", add_special_tokens=False)[1:]

    def parse(self, reply: str) -> str:
        """The official process_response: strip, and the training-date placeholder."""
        return reply.strip().replace("[[训练时间]]", "2023年")

    def sampling_ids(self, tokenizer: Tokenizer) -> dict[str, object]:
        # The official InvalidScoreLogitsProcessor keeps id 5 (ChatGLM-6B's "▁"; here the byte piece <0x02>).
        return {"eos_token_ids": self.stop_ids(tokenizer), "invalid_score_token_id": 5}


CHATGLM2 = ChatGLM2Format()
