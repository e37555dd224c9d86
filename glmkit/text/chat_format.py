"""Chat formats: how a family writes a conversation as one prompt, and reads the model's reply back.

One object per format, used by chat, the server, fine-tuning, the demo recipe and evaluation, so a
model is served exactly as it was trained. ChatGLM-6B's is the official one:

    [Round 0]\\n问：{q0}\\n答：{r0}\\n[Round 1]\\n问：{query}\\n答：      (the first turn is the bare query)

It has no system role: system text goes in front of the first user message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from glmkit.text.protocol import Tokenizer

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}, as OpenAI's API sends
History = Sequence[tuple[str, str]]  # (query, response) pairs, as ChatGLM's chat() takes

_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


class ChatFormatError(ValueError):
    """A conversation the format cannot write (the roles are out of order, the last turn is not the user's)."""


class ChatFormat(Protocol):
    name: str

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


@dataclass(frozen=True)
class ChatGLM6BFormat:
    name: str = "chatglm-6b"

    def prompt(self, query: str, history: History = (), system: str = "") -> str:
        if not history:
            return self.with_system(system, query)
        (first_query, first_reply), *rest = history
        history = [(self.with_system(system, first_query), first_reply), *rest]
        rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return f"{rounds}[Round {len(history)}]\n问：{query}\n答："

    def render(self, messages: Sequence[Message]) -> str:
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
        history = list(zip(contents[0:-1:2], contents[1:-1:2], strict=True))
        return self.prompt(contents[-1], history, system)

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

    @staticmethod
    def with_system(system: str, first_query: str) -> str:
        """ChatGLM-6B has no system role: system text goes in front of the first user message (the one rule
        for the server and for fine-tuning data, so a model is served as it was trained)."""
        return f"{system}\n\n{first_query}" if system else first_query


CHATGLM_6B = ChatGLM6BFormat()
