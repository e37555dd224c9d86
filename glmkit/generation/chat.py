"""Chat on top of generation: the model family's chat format, sampled answers, streamed as settled text.

The official `chat`/`stream_chat` signatures and defaults of each family, so code written for it runs as it is:
ChatGLM-6B and ChatGLM2 keep a history of (query, response) tuples; ChatGLM3 and GLM-4 (the role-token formats)
take `role=` and keep a history of {"role", "content"[, "metadata", "tools"]} messages, the reply going through
the format's `process_response` (a tool call comes back as {"name", "parameters"}). The format itself (prompt,
system text, reply clean-up, end tokens) is the `ChatFormat` of the tokenizer's model.

Unlike the official ChatGLM3/GLM-4 chat(), which drops the last generated id whatever it is (pitfall 25), the
answer here is every id before the first stop id: a reply cut by max_length keeps its last real token.

KV-cache reuse across turns (`reuse_cache=True`, the default): on the causal families (ChatGLM2/3, GLM-4) a turn
keeps its KV cache on the model, and the next turn prefills only the ids after the longest common prefix of its
prompt and the cached ids (the previous prompt and reply). The prompt is the same full prompt as without reuse
(unlike the official stream_chat with past_key_values, which feeds build_chat_input of the new message alone,
`[gMASK] sop` included, mid-sequence), so the answer is the same. ChatGLM-6B (2D prefix-LM) and beams always
prefill in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from glmkit.generation.beam import beam_search
from glmkit.generation.generate import end_tokens, stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM
from glmkit.text.chat_format import ChatFormatError
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer
from glmkit.text.streaming import TextStream

# (query, response) tuples (ChatGLM-6B, ChatGLM2), or role messages {"role", "content", ...} (ChatGLM3, GLM-4).
History = list[tuple[str, str]] | list[dict[str, Any]]

# The official chat() defaults; top_k 50 is Hugging Face generate's silent default, which applies too.
CHAT_DEFAULTS: dict[str, Any] = dict(max_length=2048, do_sample=True, top_p=0.7, temperature=0.95, top_k=50)
# ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B-chat's chat(): max_length 8192, top_p 0.8, temperature 0.8 (spec 4.1, 4.2).
_V2_DEFAULTS: dict[str, Any] = dict(max_length=8192, top_p=0.8, temperature=0.8)
FAMILY_CHAT_DEFAULTS: dict[str, dict[str, Any]] = {"chatglm2": _V2_DEFAULTS, "chatglm3": _V2_DEFAULTS,
                                                   "glm4": _V2_DEFAULTS}


def stream_text(model: GLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                reuse_cache: bool = False) -> Iterator[str]:
    """Yield the answer so far after each token that changes it; end on an end token or a stop string.

    With beams the answer is known only when the search ends, so it is yielded once. `reuse_cache`: start from
    the KV cache the last call with reuse left on the model, and leave this one's (see stream_tokens)."""
    if params.num_beams > 1:
        yield beam_text(model, tokenizer, prompt_ids, params)
        return
    eos = set(end_tokens(model, params))
    new: list[int] = []
    stream = TextStream(params.stop)
    for tokens in stream_tokens(model, [prompt_ids], params, reuse_cache=reuse_cache):
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
    fmt = chat_format_for(tokenizer)
    defaults = {**CHAT_DEFAULTS, **FAMILY_CHAT_DEFAULTS.get(fmt.name, {})}
    if num_beams > 1:
        defaults["do_sample"] = False
    options = {**defaults, **kwargs, "num_beams": num_beams}
    return SamplingParams(**fmt.sampling_ids(tokenizer), **options)


def role_history(history: History) -> list[dict[str, Any]]:
    """A role format's history as message dicts (copied); (query, response) tuples become a user/assistant pair."""
    messages: list[dict[str, Any]] = []
    for item in history:
        if isinstance(item, dict):
            messages.append(dict(item))
        else:
            query, response = item
            messages += [{"role": "user", "content": query}, {"role": "assistant", "metadata": "", "content": response}]
    return messages


def stream_chat(
    model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, role: str = "user",
    reuse_cache: bool = True, **kwargs: Any
) -> Iterator[tuple[str | dict[str, Any], History]]:
    """Yield (response so far, history including this turn), as the official stream_chat does.

    ChatGLM-6B/ChatGLM2: history + [(query, response)]. ChatGLM3/GLM-4: history + [{"role": role, "content":
    query}] + one assistant message per reply segment, and the response as process_response gives it (text, or
    {"name", "parameters"} for a tool call when history[0] is a system message with "tools").

    `reuse_cache` (causal families, no beams): prefill only what the last turn's cache does not already hold
    (see the module's docstring); False prefills the whole prompt and keeps no cache."""
    params = chat_params(model, tokenizer, **kwargs)
    fmt = chat_format_for(tokenizer)
    if not fmt.has_roles:
        if role != "user":
            raise ChatFormatError(f"{fmt.name}'s chat has no roles (role={role!r}): only user queries")
        pairs = list(history or [])
        prompt_ids = fmt.prompt_ids(tokenizer, query, pairs)
        for text in stream_text(model, tokenizer, prompt_ids, params, reuse_cache):
            response = fmt.parse(text)
            yield response, pairs + [(query, response)]
        return
    messages = role_history(history or [])
    prompt_ids = fmt.prompt_ids(tokenizer, query, messages, role=role)
    asked = [*messages, {"role": role, "content": query}]
    for text in stream_text(model, tokenizer, prompt_ids, params, reuse_cache):
        yield fmt.process_response(text, asked)


def chat(model: GLM, tokenizer: Tokenizer, query: str, history: History | None = None, role: str = "user",
         reuse_cache: bool = True, **kwargs: Any) -> tuple[str | dict[str, Any], History]:
    """One full answer: (response, history with this turn), in the family's history shape (see stream_chat)."""
    fmt = chat_format_for(tokenizer)
    if fmt.has_roles:
        response, new_history = fmt.process_response("", [*role_history(history or []), {"role": role, "content": query}])
    else:
        response, new_history = "", [*(history or []), (query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, role, reuse_cache,  # noqa: B007
                                             **kwargs):
        pass
    return response, new_history
