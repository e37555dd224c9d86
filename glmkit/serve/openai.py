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
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from glmkit.engine.protocol import EngineClient
from glmkit.engine.request import StepOutput
from glmkit.engine.scheduler import QueueFull
from glmkit.generation.sampling import SamplingParams
from glmkit.serve.metrics import Metrics
from glmkit.serve.protocol import ChatCompletionRequest, CompletionRequest, LegacyRequest, Message, SamplingFields
from glmkit.text.chat_format import ChatFormat, ChatFormatError
from glmkit.text.protocol import Tokenizer
from glmkit.text.streaming import TextStream

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


# Seconds a client refused by a full queue is asked to wait (Retry-After): about one short reply's time.
RETRY_AFTER_S = 1


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Serving:
    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, chat_format: ChatFormat, model_name: str,
                 context: int) -> None:
        self.engine, self.tokenizer, self.model_name, self.context = engine, tokenizer, model_name, context
        self.chat_format = chat_format
        self.metrics = Metrics(engine)

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

    def params(self, request: SamplingFields, choice: int = 0) -> SamplingParams:
        """Choice i of n samples with seed + i, so that a seeded request's n answers differ and repeat."""
        return SamplingParams(
            max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
            temperature=request.temperature or 1.0, top_p=request.top_p, seed=request.choice_seed(choice),
            **self.chat_format.sampling_ids(self.tokenizer),
        )

    async def admit(self, ids: list[int], params: list[SamplingParams]) -> list[AsyncIterator[StepOutput]]:
        """Every choice admitted to the engine, or none (a refusal closes those already admitted).

        This happens before any response starts, so a full queue is a 429 even for a stream."""
        admitted: list[AsyncIterator[StepOutput]] = []
        try:
            for p in params:
                admitted.append(await self.engine.submit(ids, p, uuid.uuid4().hex))
        except BaseException as e:
            for outputs in admitted:
                await outputs.aclose()
            if isinstance(e, QueueFull):
                raise APIError(429, f"the server is busy ({e}); retry shortly", code="rate_limit_exceeded",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from e
            if isinstance(e, ValueError):
                raise APIError(400, str(e)) from e
            raise
        return admitted

    async def stream(self, outputs: AsyncIterator[StepOutput], prompt_tokens: int, stop: tuple[str, ...],
                     clean: bool) -> AsyncIterator[tuple[str, Completion | None]]:
        """Yield (new text, None) as it settles, then ("", the whole completion) at the end."""
        new: list[int] = []
        finish = "length"
        # The clean-up may still change the last character (punctuation beside a CJK character).
        text = TextStream(stop, self.chat_format.parse, hold_last=True) if clean else TextStream(stop)
        started = time.perf_counter()
        # aclosing: leaving early (a stop string, a client gone) closes the engine's outputs, which aborts
        # the request and frees its batch slot at once.
        async with aclosing(outputs):
            async for output in outputs:
                if output.finish_reason == "error":
                    raise APIError(500, "generation failed on the server; see its log", code="engine_error")
                if output.finish_reason == "stop" or output.token_id is None:
                    finish = "stop"
                    break
                new.append(output.token_id)
                if delta := text.update(self.tokenizer.decode(new)):
                    yield delta, None
                if text.stopped:
                    finish = "stop"
                    break
        if delta := text.finish(self.tokenizer.decode(new)):
            yield delta, None
        self.metrics.generation(prompt_tokens, len(new), time.perf_counter() - started)
        yield "", Completion(text.final, prompt_tokens, len(new), finish)

    async def complete(self, outputs: AsyncIterator[StepOutput], prompt_tokens: int, stop: tuple[str, ...],
                       clean: bool) -> Completion:
        async for _, done in self.stream(outputs, prompt_tokens, stop, clean):
            if done is not None:
                return done
        raise AssertionError("the stream ended without a completion")

    async def complete_all(self, admitted: list[AsyncIterator[StepOutput]], prompt_tokens: int,
                           stop: tuple[str, ...], clean: bool) -> list[Completion]:
        """All choices to the end; if one fails, or the caller is cancelled (a client gone), the others are
        cancelled too, and each one's engine request is aborted."""
        tasks = [asyncio.ensure_future(self.complete(o, prompt_tokens, stop, clean)) for o in admitted]
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

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation as the model's chat format writes it, as ids (role tokens cannot come from text)."""
        try:
            return self.chat_format.render_ids(self.tokenizer, [{"role": m.role, "content": m.text} for m in messages])
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from e

    async def chat_completion(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        return await self._respond(request, self.chat_prompt(request.messages), chat=True)

    async def completion(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        return await self._respond(request, self.tokenizer.encode(request.prompt), chat=False)

    async def _respond(self, request: SamplingFields, prompt: list[int], chat: bool) -> dict | AsyncIterator[str]:
        """Chat answers get ChatGLM's clean-up (as model.chat does); plain completions are raw text."""
        if (name := request.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server; send the request without it",
                           code="unsupported_parameter", param=name)
        ids = self.fit(prompt, request.max_tokens)
        params = [self.params(request, i) for i in range(request.n)]  # n choices: n requests, batched together
        stop = request.stop_strings()
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        admitted = await self.admit(ids, params)
        if request.stream:
            return self._sse(admitted, len(ids), stop, rid, created, chat=chat)
        dones = await self.complete_all(admitted, len(ids), stop, clean=chat)
        kind = "chat.completion" if chat else "text_completion"
        choices = [{"index": i, **_choice_body(done.text, chat), "finish_reason": done.finish_reason}
                   for i, done in enumerate(dones)]
        return {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices,
                "usage": _usage(dones)}

    async def _sse(self, admitted: list[AsyncIterator[StepOutput]], prompt_tokens: int, stop, rid: str,
                   created: int, chat: bool) -> AsyncIterator[str]:
        """The event stream of admitted requests. It ends with [DONE]; a failure after it started ends it
        with one event carrying OpenAI's error body instead (the openai client raises it)."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": index, "delta": body, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if chat:
                for i in range(len(admitted)):
                    yield chunk(i, None, None, first=True)
            streams = [self.stream(o, prompt_tokens, stop, clean=chat) for o in admitted]
            async for i, (delta, done) in _merge(streams):
                yield chunk(i, delta, None) if done is None else chunk(i, None, done.finish_reason)
        except Exception as e:  # noqa: BLE001 (the status line is gone: the error goes in the stream)
            error = e if isinstance(e, APIError) else APIError(500, "generation failed on the server; see its log",
                                                              code="server_error")
            if not isinstance(e, APIError):
                log.exception("stream %s failed", rid)
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
        (done,) = await self.complete_all(admitted, len(ids), (), clean=True)
        history = [*[list(turn) for turn in request.history], [request.prompt, done.text]]
        return {"response": done.text, "history": history, "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _usage(dones: list[Completion]) -> dict:
    """The prompt counts once however many choices share it (OpenAI's rule)."""
    prompt, completion = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choice_body(text: str, chat: bool) -> dict:
    return {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}


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
