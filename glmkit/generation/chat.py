"""ChatGLM-6B's conversation format and its text-level generation (streaming, stop strings).

The prompt format and the response clean-up are the official ones, so a model fine-tuned with the
official scripts answers here as it does there:

    [Round 0]\\n问：{q0}\\n答：{r0}\\n[Round 1]\\n问：{query}\\n答：      (the first turn is the bare query)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from glmkit.generation.beam import beam_search
from glmkit.generation.generate import end_tokens, stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

History = list[tuple[str, str]]

# The official chat() defaults; top_k 50 is Hugging Face generate's silent default, which applies too.
CHAT_DEFAULTS: dict[str, Any] = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)

_CJK = "\u4e00-\u9fff"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def convert_tokens_to_ids(self, token: str) -> int: ...

    @property
    def eos_token_id(self) -> int: ...


def build_prompt(query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{query}\n答："


def with_system(system: str, first_query: str) -> str:
    """ChatGLM-6B has no system role: system text goes in front of the first user message (the one
    rule for the OpenAI server and for fine-tuning data, so a model is served as it was trained)."""
    return f"{system}\n\n{first_query}" if system else first_query


def process_response(text: str) -> str:
    """The official clean-up: the tokenizer normalises full-width punctuation to ASCII, so the model
    writes ASCII; put it back to full width where it touches a Chinese character."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(rf"([{_CJK}]){mark}", rf"\1{full}", text)
        text = re.sub(rf"{mark}([{_CJK}])", rf"{full}\1", text)
    return text


def held_back(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text safe to show, whether a stop string ended it).

    A tail that could still grow into a stop string is withheld, so streamed text is never retracted."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if cuts:
        return text[: min(cuts)], True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


def stream_text(model: GLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
    """Yield the answer so far after each token that changes it; end on an end token or a stop string.

    With beams the answer is known only when the search ends, so it is yielded once."""
    if params.num_beams > 1:
        yield beam_text(model, tokenizer, prompt_ids, params)
        return
    eos = set(end_tokens(model, params))
    new: list[int] = []
    shown = ""
    for tokens in stream_tokens(model, [prompt_ids], params):
        token = int(tokens[0])
        if token in eos:
            break
        new.append(token)
        text, stopped = held_back(tokenizer.decode(new), params.stop)
        if stopped:
            yield text
            return
        # A character split across byte-fallback tokens decodes to U+FFFD until its last byte arrives.
        if text != shown and not text.endswith("\ufffd"):
            shown = text
            yield text
    final = tokenizer.decode(new)
    if final != shown:
        yield final


def beam_text(model: GLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> str:
    """The best beam's text, cut before the first stop string."""
    eos = set(end_tokens(model, params))
    text = tokenizer.decode([t for t in beam_search(model, prompt_ids, params)[0].tokens if t not in eos])
    cut, stopped = held_back(text, params.stop)
    return cut if stopped else text


def chat_params(model: GLM, tokenizer: Tokenizer, num_beams: int = 1, **kwargs: Any) -> SamplingParams:
    """The official chat() options; with num_beams > 1 the chat default of sampling gives way to the search
    (asking for both explicitly is an error)."""
    kwargs.pop("logits_processor", None)  # the official API passes one; its rule is built in
    defaults = {**CHAT_DEFAULTS, "do_sample": False} if num_beams > 1 else CHAT_DEFAULTS
    options = {**defaults, **kwargs, "num_beams": num_beams}
    return SamplingParams.for_tokenizer(tokenizer, **options)


def stream_chat(
    model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, **kwargs: Any
) -> Iterator[tuple[str, History]]:
    """Yield (response so far, history including this turn), as the official stream_chat does."""
    history = list(history or [])
    params = chat_params(model, tokenizer, **kwargs)
    prompt_ids = tokenizer.encode(build_prompt(query, history))
    for text in stream_text(model, tokenizer, prompt_ids, params):
        response = process_response(text)
        yield response, history + [(query, response)]


def chat(model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, **kwargs: Any):
    """One full answer: (response, history + [(query, response)])."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, **kwargs):  # noqa: B007
        pass
    return response, new_history
