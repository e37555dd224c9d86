"""Chat on top of generation: the model family's chat format, sampled answers, streamed as settled text.

The official `chat`/`stream_chat` signatures and defaults, so code written for ChatGLM-6B runs as it is.
The format itself (prompt, system text, reply clean-up, end tokens) is the `ChatFormat` of the tokenizer's model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from glmkit.generation.beam import beam_search
from glmkit.generation.generate import end_tokens, stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer
from glmkit.text.streaming import TextStream

History = list[tuple[str, str]]

# The official chat() defaults; top_k 50 is Hugging Face generate's silent default, which applies too.
CHAT_DEFAULTS: dict[str, Any] = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)


def stream_text(model: GLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
    """Yield the answer so far after each token that changes it; end on an end token or a stop string.

    With beams the answer is known only when the search ends, so it is yielded once."""
    if params.num_beams > 1:
        yield beam_text(model, tokenizer, prompt_ids, params)
        return
    eos = set(end_tokens(model, params))
    new: list[int] = []
    stream = TextStream(params.stop)
    for tokens in stream_tokens(model, [prompt_ids], params):
        token = int(tokens[0])
        if token in eos:
            break
        new.append(token)
        if stream.update(tokenizer.decode(new)):
            yield stream.shown
        if stream.stopped:
            break
    if stream.finish(tokenizer.decode(new)):
        yield stream.shown


def beam_text(model: GLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams) -> str:
    """The best beam's text, cut before the first stop string."""
    eos = set(end_tokens(model, params))
    stream = TextStream(params.stop)
    stream.finish(tokenizer.decode([t for t in beam_search(model, prompt_ids, params)[0].tokens if t not in eos]))
    return stream.final


def chat_params(model: GLM, tokenizer: Tokenizer, num_beams: int = 1, **kwargs: Any) -> SamplingParams:
    """The official chat() options; with num_beams > 1 the chat default of sampling gives way to the search
    (asking for both explicitly is an error)."""
    kwargs.pop("logits_processor", None)  # the official API passes one; its rule is built in
    defaults = {**CHAT_DEFAULTS, "do_sample": False} if num_beams > 1 else CHAT_DEFAULTS
    options = {**defaults, **kwargs, "num_beams": num_beams}
    return SamplingParams(**chat_format_for(tokenizer).sampling_ids(tokenizer), **options)


def stream_chat(
    model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, **kwargs: Any
) -> Iterator[tuple[str, History]]:
    """Yield (response so far, history including this turn), as the official stream_chat does."""
    history = list(history or [])
    params = chat_params(model, tokenizer, **kwargs)
    fmt = chat_format_for(tokenizer)
    prompt_ids = fmt.prompt_ids(tokenizer, query, history)
    for text in stream_text(model, tokenizer, prompt_ids, params):
        response = fmt.parse(text)
        yield response, history + [(query, response)]


def chat(model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, **kwargs: Any):
    """One full answer: (response, history + [(query, response)])."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, **kwargs):  # noqa: B007
        pass
    return response, new_history
