"""The OpenAI-compatible and legacy ChatGLM APIs: requests in, engine calls, responses out.

No tensors here: prompts become token ids through the tokenizer, the engine client produces token ids,
and this module turns them back into text, applying stop strings and the chat format's reply clean-up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from glmkit.engine.protocol import EngineClient
from glmkit.engine.request import StepOutput, TokenLogprob
from glmkit.engine.scheduler import QueueFull
from glmkit.generation import constraints
from glmkit.generation.sampling import SamplingParams
from glmkit.serve.metrics import Metrics
from glmkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LegacyRequest,
    Message,
    NamedToolChoice,
    SamplingFields,
)
from glmkit.text.chat_format import ChatFormat, ChatFormatError
from glmkit.text.protocol import Tokenizer
from glmkit.text.streaming import TextStream, first_stop

log = logging.getLogger("glmkit.serve")


class APIError(Exception):
    """An error to send back in OpenAI's JSON shape (and, once a stream has started, as its last event)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


Clean = Callable[[str], str] | None  # what a reply's text goes through before it is shown (None: nothing)

# Seconds a client refused by a full queue is asked to wait (Retry-After): about one short reply's time.
RETRY_AFTER_S = 1


def busy(error: QueueFull) -> APIError:
    """A full queue's 429, with Retry-After."""
    return APIError(429, f"the server is busy ({error}); retry shortly", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Completion:
    text: str | None  # the reply's text (None: a tool call without text)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tool_calls: list[dict] | None = None  # OpenAI-shape calls parsed from the reply (finish_reason "tool_calls")
    logprobs: list[TokenInfo] = field(default_factory=list)  # the reply's tokens, when asked for
    prompt_logprobs: list[TokenInfo] = field(default_factory=list)  # the prompt's (echo), first one's logprob None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the engine's prefix cache


@dataclass
class TokenInfo:
    """A token's text (its share of the decoded answer), its logprob and its alternatives as (text, logprob)."""

    text: str
    logprob: float | None
    top: list[tuple[str, float]]


@dataclass
class Piece:
    """What `Serving.stream` yields: newly settled text, the tokens' logprobs since the last piece, and at the end
    the whole completion."""

    text: str = ""
    logprobs: list[TokenInfo] = field(default_factory=list)
    done: Completion | None = None
    prompt: list[TokenInfo] | None = None  # the prompt's tokens (echo with logprobs), in the first piece


@dataclass
class Tools:
    """The tools a reply is rendered and parsed with (None: none; tool_choice "none" renders none)."""

    schemas: list[dict] | None
    parse: bool  # whether the reply is read for calls
    forced: bool = False  # tool_choice "required" or a named function: the reply is constrained to a call


class Serving:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, chat_format: ChatFormat, model_name: str,
                 context: int) -> None:
        self.engine, self.tokenizer, self.model_name, self.context = engine, tokenizer, model_name, context
        self.chat_format = chat_format
        self.metrics = Metrics(engine)
        self.tools_supported = _renders_tools(chat_format, tokenizer)
        self.end_ids = frozenset(chat_format.sampling_ids(tokenizer)["eos_token_ids"])  # what every request ends at

    # ----- shared steps

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def fit(self, ids: list[int], max_tokens: int | None) -> list[int]:
        """The prompt's ids, if they and max_tokens fit the model's context."""
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {self.context}; "
                                "shorten the messages", code="context_length_exceeded", param="messages")
        if max_tokens is not None and len(ids) + max_tokens > self.context:
            raise APIError(400, f"max_tokens {max_tokens} plus the prompt's {len(ids)} tokens exceeds the model's "
                                f"context of {self.context}; ask for at most {self.context - len(ids)}",
                           code="context_length_exceeded", param="max_tokens")
        return ids

    def params(self, request: SamplingFields, choice: int = 0,
               grammar: constraints.Grammar | None = None) -> SamplingParams:
        """Choice i of n samples with seed + i, so that a seeded request's n answers differ and repeat."""
        return SamplingParams(
            max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
            temperature=request.temperature or 1.0, top_p=request.top_p, seed=request.choice_seed(choice),
            grammar=grammar, **self.chat_format.sampling_ids(self.tokenizer),
        )

    async def grammar(self, request: ChatCompletionRequest | CompletionRequest, chat: bool,
                      tools: Tools | None) -> constraints.Grammar | None:
        """The grammar a request's replies are held to: a forced tool call (tool_choice "required" or a named
        function) in the family's call syntax, else its response_format's JSON; None for plain text. Compiled off
        the event loop (a 151K vocabulary's tables take seconds the first time, a schema up to ~0.2 s)."""
        if tools is not None and tools.forced:
            functions = [t["function"] for t in tools.schemas]
            build, param = (lambda vocab: constraints.tool_call_grammar(vocab, functions,
                                                                        self.chat_format.call_syntax)), "tools"
        elif request.response_format is not None and request.response_format.type != "text":
            schema = request.response_format.json_schema_or_none()
            prefix = self.chat_format.answer_prefix if chat else ""
            build, param = (lambda vocab: constraints.json_grammar(vocab, schema, prefix)), "response_format"
        else:
            return None
        try:
            return await asyncio.to_thread(lambda: build(constraints.vocabulary(self.tokenizer)))
        except constraints.ConstraintError as e:
            unsupported = isinstance(e, constraints.UnsupportedSchema | constraints.Unavailable)
            code = "unsupported_parameter" if unsupported else "invalid_schema"
            raise APIError(400, str(e), code=code, param=param) from e

    async def admit(self, ids: list[int], params: list[SamplingParams], logprobs: int | None = None,
                    prompt_logprobs: bool = False) -> list[AsyncIterator[StepOutput]]:
        """Every choice admitted to the engine, or none (a refusal closes those already admitted).

        This happens before any response starts, so a full queue is a 429 even for a stream."""
        admitted: list[AsyncIterator[StepOutput]] = []
        extra = {} if logprobs is None and not prompt_logprobs else {"logprobs": logprobs,
                                                                     "prompt_logprobs": prompt_logprobs}
        try:
            for p in params:
                admitted.append(await self.engine.submit(ids, p, uuid.uuid4().hex, **extra))
        except BaseException as e:
            for outputs in admitted:
                await outputs.aclose()
            if isinstance(e, QueueFull):
                raise busy(e) from e
            if isinstance(e, ValueError):
                raise APIError(400, str(e)) from e
            raise
        return admitted

    async def stream(self, outputs: AsyncIterator[StepOutput], prompt_ids: list[int], stop: tuple[str, ...],
                     clean: Clean, tools: Tools | None = None) -> AsyncIterator[Piece]:
        """Yield Pieces as text settles, then one with the whole completion; `clean` (None: raw text) is applied to
        the text before it is shown.

        With tools read for calls, a reply whose first line is not empty (where ChatGLM3 and GLM-4 write a tool's
        name; a plain answer starts with a newline) is held back to its end, then parsed: a call comes back as
        `tool_calls`, anything else as its text."""
        new: list[int] = []
        finish = "length"
        # The clean-up may still change the last character (punctuation beside a CJK character).
        text = TextStream(stop, clean, hold_last=True) if clean is not None else TextStream(stop)
        reading_calls = tools is not None and tools.parse
        held = reading_calls  # undecided: could still be a call
        decoded = shared = ""
        pending: list[TokenInfo] = []
        every: list[TokenInfo] = []
        prompt_info: list[TokenInfo] = []
        cached = 0
        started = time.perf_counter()
        # aclosing: leaving early (a stop string, a client gone) closes the engine's outputs, which aborts
        # the request and frees its batch slot at once.
        async with aclosing(outputs):
            async for output in outputs:
                if output.cached_tokens is not None:
                    cached = output.cached_tokens
                    self.metrics.prefix_cache(len(prompt_ids), cached)
                if output.prompt_logprobs is not None:
                    prompt_info = self.prompt_token_infos(prompt_ids, output.prompt_logprobs)
                    yield Piece(prompt=prompt_info)
                if output.finish_reason == "error":
                    raise APIError(500, "generation failed on the server; see its log", code="engine_error")
                if output.token_id is None or (output.finish_reason == "stop" and output.token_id in self.end_ids):
                    finish = "stop"  # an end token is not text
                    break
                if output.finish_reason == "stop":
                    finish = "stop"  # the token that completed a grammar: text, and the last one
                new.append(output.token_id)
                decoded = self.tokenizer.decode(new)
                if output.logprob is not None:
                    share, shared = _share(shared, decoded)
                    info = self.token_info(output.logprob, share)
                    pending.append(info)
                    every.append(info)
                if held and "\n" in decoded:
                    held = decoded.split("\n", 1)[0].strip() != ""  # an empty first line: a plain answer
                if held:
                    if first_stop(decoded, stop) is not None:
                        finish = "stop"
                        break
                    continue
                if delta := text.update(decoded):
                    yield Piece(delta, pending)
                    pending = []
                if text.stopped:
                    finish = "stop"
                    break
        raw = decoded if (cut := first_stop(decoded, stop)) is None else decoded[:cut]
        calls = None
        if reading_calls:
            message = self.chat_format.parse_response(raw, tools.schemas)
            calls = message.get("tool_calls")
        self.metrics.generation(len(prompt_ids), len(new), time.perf_counter() - started)
        if calls:
            content = message.get("content")
            if content and not text.shown:
                yield Piece(content, pending)
                pending = []
            yield Piece("", pending, Completion(content, len(prompt_ids), len(new), "tool_calls", calls, every,
                                                prompt_info, cached))
            return
        delta = text.finish(decoded)
        if delta or pending:
            yield Piece(delta, pending)
        yield Piece("", [], Completion(text.final, len(prompt_ids), len(new), finish, None, every, prompt_info,
                                       cached))

    def token_info(self, logprob: TokenLogprob, text: str) -> TokenInfo:
        """An engine TokenLogprob with texts: the token's own share of the answer; an alternative's, decoded alone."""
        top = [(text if token == logprob.token_id else self.tokenizer.decode([token]), value)
               for token, value in logprob.top]
        return TokenInfo(text, logprob.logprob, top)

    def prompt_token_infos(self, prompt_ids: list[int], logprobs: list[TokenLogprob | None]) -> list[TokenInfo]:
        shared, infos = "", []
        for i, logprob in enumerate(logprobs):
            share, shared = _share(shared, self.tokenizer.decode(prompt_ids[: i + 1]))
            infos.append(TokenInfo(share, None, []) if logprob is None else self.token_info(logprob, share))
        return infos

    async def complete(self, outputs: AsyncIterator[StepOutput], prompt_ids: list[int], stop: tuple[str, ...],
                       clean: Clean, tools: Tools | None = None) -> Completion:
        async for piece in self.stream(outputs, prompt_ids, stop, clean, tools):
            if piece.done is not None:
                return piece.done
        raise AssertionError("the stream ended without a completion")

    async def complete_all(self, admitted: list[AsyncIterator[StepOutput]], prompt_ids: list[int],
                           stop: tuple[str, ...], clean: Clean, tools: Tools | None = None) -> list[Completion]:
        """All choices to the end; if one fails, or the caller is cancelled (a client gone), the others are
        cancelled too, and each one's engine request is aborted."""
        tasks = [asyncio.ensure_future(self.complete(o, prompt_ids, stop, clean, tools)) for o in admitted]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            for outputs in admitted:
                await outputs.aclose()

    # ----- endpoints

    def tools_for(self, request: ChatCompletionRequest) -> Tools | None:
        """The tools to render and read calls with, by tool_choice: "none" renders none and reads none; a named
        function renders only that tool; "auto" (the default with tools) and "required" render them all. "required"
        and a named function force a call (`grammar` constrains the reply to one)."""
        choice = request.tool_choice
        if not request.tools:
            if choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice asks for a tool call but the request has no tools",
                               param="tool_choice")
            return None
        if not self.tools_supported:
            raise APIError(400, f"this model's chat format ({self.chat_format.name}) has no tool calls: send the "
                                "request without tools (ChatGLM3 and GLM-4 models have them)",
                           code="unsupported_parameter", param="tools")
        schemas = [t.for_format() for t in request.tools]
        if choice == "none":
            return Tools(None, parse=False)
        if isinstance(choice, NamedToolChoice):
            named = [t for t in schemas if t["function"]["name"] == choice.function.name]
            if not named:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not one of the tools "
                                    f"({[t['function']['name'] for t in schemas]})", param="tool_choice")
            return Tools(named, parse=True, forced=True)
        return Tools(schemas, parse=True, forced=choice == "required")

    def chat_prompt(self, messages: list[Message], tools: Tools | None = None) -> list[int]:
        """The conversation as the model's chat format writes it, as ids (role tokens cannot come from text)."""
        try:
            return self.chat_format.render_ids(self.tokenizer, [m.for_format() for m in messages],
                                               tools=tools.schemas if tools else None)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from e

    async def chat_completion(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        tools = self.tools_for(request)
        return await self._respond(request, self.chat_prompt(request.messages, tools), chat=True, tools=tools)

    async def completion(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        return await self._respond(request, self.tokenizer.encode(request.prompt), chat=False)

    async def _respond(self, request: ChatCompletionRequest | CompletionRequest, prompt: list[int], chat: bool,
                       tools: Tools | None = None) -> dict | AsyncIterator[str]:
        """Chat answers get ChatGLM's clean-up (as model.chat does); plain completions are raw text."""
        if (name := request.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server; send the request without it",
                           code="unsupported_parameter", param=name)
        ids = self.fit(prompt, request.max_tokens)
        grammar = await self.grammar(request, chat, tools)
        # n choices: n requests, batched together, each walking the grammar on its own
        params = [self.params(request, i, grammar) for i in range(request.n)]
        clean = self.clean(chat, json_reply=grammar is not None and not (tools and tools.forced))
        stop = request.stop_strings()
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        count = request.logprob_count()
        echo = "" if chat or not request.echo else request.prompt
        admitted = await self.admit(ids, params, count, prompt_logprobs=bool(echo) and count is not None)
        reply = Reply(self, rid, created, chat, count is not None, echo)
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            return self._sse(admitted, ids, stop, reply, tools, usage, clean)
        dones = await self.complete_all(admitted, ids, stop, clean=clean, tools=tools)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": [reply.choice(i, done) for i, done in enumerate(dones)],
                "usage": _usage(dones)}

    def clean(self, chat: bool, json_reply: bool) -> Clean:
        """How a reply's text is shown: chat answers get the format's clean-up (as model.chat does), except JSON
        replies, which are only stripped (the clean-up rewrites punctuation and would touch strings); completions
        are raw text."""
        if not chat:
            return None
        return str.strip if json_reply else self.chat_format.parse

    async def _sse(self, admitted: list[AsyncIterator[StepOutput]], prompt_ids: list[int], stop, reply: Reply,
                   tools: Tools | None, include_usage: bool, clean: Clean) -> AsyncIterator[str]:
        """The event stream of admitted requests. It ends with [DONE] (after a chunk with `usage` and no choices
        when include_usage); a failure after it started ends it with one event carrying OpenAI's error body
        instead (the openai client raises it)."""
        try:
            if reply.chat:
                for i in range(len(admitted)):
                    yield reply.event(reply.chunk(i, {"role": "assistant", "content": ""}), include_usage)
            dones: dict[int, Completion] = {}
            streams = [self.stream(o, prompt_ids, stop, clean, tools) for o in admitted]
            echoed: set[int] = set()
            async for i, piece in _merge(streams):
                for chunk in reply.pieces(i, piece, echo_prompt=i not in echoed):
                    yield reply.event(chunk, include_usage)
                echoed.add(i)
                if piece.done is not None:
                    dones[i] = piece.done
            if include_usage:
                yield reply.event({**reply.head(), "choices": [], "usage": _usage([dones[i] for i in sorted(dones)])})
        except Exception as e:  # noqa: BLE001 (the status line is gone: the error goes in the stream)
            error = e if isinstance(e, APIError) else APIError(500, "generation failed on the server; see its log",
                                                              code="server_error")
            if not isinstance(e, APIError):
                log.exception("stream %s failed", reply.rid)
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        finally:
            for outputs in admitted:
                await outputs.aclose()
        yield "data: [DONE]\n\n"

    async def legacy(self, request: LegacyRequest) -> dict:
        """ChatGLM-6B's api.py: POST / {prompt, history, max_length, top_p, temperature}."""
        if request.max_length is not None and request.max_length > self.context:
            raise APIError(400, f"max_length {request.max_length} exceeds the model's context of {self.context} "
                                f"tokens (prompt and answer together); send at most {self.context}, or leave it out",
                           code="context_length_exceeded", param="max_length")
        max_length = request.max_length or self.context
        try:
            ids = self.fit(self.chat_format.prompt_ids(self.tokenizer, request.prompt, request.history), None)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="history") from e
        if len(ids) >= max_length:
            raise APIError(400, f"the prompt has {len(ids)} tokens, which leaves no room under "
                                f"max_length={max_length}", param="max_length")
        params = SamplingParams(max_length=max_length, do_sample=request.temperature > 0,
                                temperature=request.temperature or 1.0, top_p=request.top_p, top_k=50,
                                **self.chat_format.sampling_ids(self.tokenizer))
        admitted = await self.admit(ids, [params])
        (done,) = await self.complete_all(admitted, ids, (), clean=self.chat_format.parse)
        history = [*[list(turn) for turn in request.history], [request.prompt, done.text]]
        return {"response": done.text, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _usage(dones: list[Completion]) -> dict:
    """The prompt counts once however many choices share it (OpenAI's rule), and so do its cached tokens: the first
    choice's (the later choices of a prompt find the blocks the first one left in the prefix cache)."""
    prompt, completion = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": dones[0].cached_tokens}}


def _share(shown: str, decoded: str) -> tuple[str, str]:
    """(a token's share of the decoded text, the text shared out so far): what it added since the last token
    that completed its characters (nothing while a character's bytes are incomplete: the token that completes
    it gets the whole character)."""
    if decoded.endswith("\ufffd"):
        return "", shown
    common = len(shown) if decoded.startswith(shown) else len(_common_prefix(shown, decoded))
    return decoded[common:], decoded


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def _renders_tools(chat_format: ChatFormat, tokenizer: Tokenizer) -> bool:
    """Whether the format writes tools (ChatGLM3, GLM-4), asked of the format itself once."""
    tool = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object", "properties": {}}}}
    try:
        chat_format.render_ids(tokenizer, [{"role": "user", "content": "hi"}], tools=[tool])
    except ChatFormatError:
        return False
    return True


class Reply:
    """One response's bodies: choices, chunks and logprobs in OpenAI's shapes (chat or legacy completions)."""

    def __init__(self, serving: Serving, rid: str, created: int, chat: bool, logprobs: bool, echo: str) -> None:
        self.serving, self.rid, self.created, self.chat, self.logprobs, self.echo = (serving, rid, created, chat,
                                                                                    logprobs, echo)
        self.offsets: dict[int, int] = {}  # per choice: text_offset of its next token (legacy logprobs)

    def head(self) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.serving.model_name}

    def event(self, payload: dict, include_usage: bool = False) -> str:
        if include_usage and "usage" not in payload:
            payload = {**payload, "usage": None}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self.head(), "choices": [choice]}

    def text_chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None = None) -> dict:
        return {**self.head(), "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": finish}]}

    def pieces(self, index: int, piece: Piece, echo_prompt: bool) -> list[dict]:
        """The chunks one Piece of choice `index` becomes."""
        done = piece.done
        if not self.chat:
            out = []
            if echo_prompt and self.echo:
                out.append(self.text_chunk(index, self.echo, self.legacy_logprobs(index, piece.prompt or [])))
            if piece.text or piece.logprobs:
                out.append(self.text_chunk(index, piece.text, self.legacy_logprobs(index, piece.logprobs)))
            if done is not None:
                out.append(self.text_chunk(index, "", None, done.finish_reason))
            return out
        out = []
        if piece.text or piece.logprobs:
            delta = {"content": piece.text} if piece.text else {}
            out.append(self.chunk(index, delta, logprobs=self.chat_logprobs(piece.logprobs)))
        if done is not None and done.tool_calls:
            # OpenAI's shape: a first delta with index, id, type and the name (arguments ""), then the arguments;
            # glmkit parses a call once it has ended, so its arguments come whole, in one delta.
            for k, call in enumerate(done.tool_calls):
                named = {"index": k, "id": call["id"], "type": "function",
                         "function": {"name": call["function"]["name"], "arguments": ""}}
                out.append(self.chunk(index, {"tool_calls": [named]}))
                arguments = {"index": k, "function": {"arguments": call["function"]["arguments"]}}
                out.append(self.chunk(index, {"tool_calls": [arguments]}))
        if done is not None:
            out.append(self.chunk(index, {}, done.finish_reason))
        return out

    def choice(self, index: int, done: Completion) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": done.text}
            if done.tool_calls:
                message["tool_calls"] = done.tool_calls
            return {"index": index, "message": message, "logprobs": self.chat_logprobs(done.logprobs),
                    "finish_reason": done.finish_reason}
        logprobs = self.legacy_logprobs(index, [*(done.prompt_logprobs if self.echo else []), *done.logprobs])
        return {"index": index, "text": self.echo + (done.text or ""), "logprobs": logprobs,
                "finish_reason": done.finish_reason}

    def chat_logprobs(self, infos: list[TokenInfo]) -> dict | None:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}"""
        if not self.logprobs:
            return None

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]}
                            for t in infos], "refusal": None}

    def legacy_logprobs(self, index: int, infos: list[TokenInfo]) -> dict | None:
        """OpenAI's completions shape: tokens, token_logprobs, top_logprobs (text -> logprob), text_offset."""
        if not self.logprobs:
            return None
        offsets = []
        for info in infos:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(info.text)
        return {"tokens": [t.text for t in infos], "token_logprobs": [t.logprob for t in infos],
                "top_logprobs": [None if t.logprob is None else dict(t.top) for t in infos], "text_offset": offsets}


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several streams as they come, tagged with the stream's index.

    Leaving early (the client went away) cancels the pumps, which closes every stream and so aborts
    its engine request."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((i, item))
        except Exception as e:  # surfaced to the consumer, which re-raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
