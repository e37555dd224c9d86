"""The OpenAI-compatible and legacy ChatGLM APIs: requests in, engine calls, responses out.

No tensors here: prompts become token ids through the tokenizer, the AsyncEngine produces token ids,
and this module turns them back into text, applying stop strings and the chat format's reply clean-up.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from glmkit.engine.protocol import EngineClient
from glmkit.generation.sampling import SamplingParams
from glmkit.serve.protocol import ChatCompletionRequest, CompletionRequest, LegacyRequest, Message, SamplingFields
from glmkit.text.chat_format import ChatFormat, ChatFormatError
from glmkit.text.protocol import Tokenizer
from glmkit.text.streaming import TextStream


class APIError(Exception):
    """An error to send back in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)  # "endpoint status" -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0

    def count(self, endpoint: str, status: int) -> None:
        key = f'endpoint="{endpoint}",status="{status}"'
        self.requests[key] = self.requests.get(key, 0) + 1


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
        self.metrics = Metrics()

    # ----- shared steps

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def encode(self, prompt: str, max_tokens: int | None) -> list[int]:
        ids = self.tokenizer.encode(prompt)
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
            temperature=request.temperature or 1.0, top_p=request.top_p,
            seed=None if request.seed is None else request.seed + choice,
            **self.chat_format.sampling_ids(self.tokenizer),
        )

    async def stream(self, ids: list[int], params: SamplingParams, stop: tuple[str, ...],
                     clean: bool) -> AsyncIterator[tuple[str, Completion | None]]:
        """Yield (new text, None) as it settles, then ("", the whole completion) at the end."""
        new: list[int] = []
        finish = "length"
        # The clean-up may still change the last character (punctuation beside a CJK character).
        text = TextStream(stop, self.chat_format.parse, hold_last=True) if clean else TextStream(stop)
        started = time.perf_counter()
        # aclosing: leaving early (a stop string, a client gone) closes the engine's iterator, which aborts
        # the request and frees its batch slot at once.
        async with aclosing(self.engine.generate(ids, params, uuid.uuid4().hex)) as outputs:
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
        self.metrics.prompt_tokens += len(ids)
        self.metrics.completion_tokens += len(new)
        self.metrics.latency_sum += time.perf_counter() - started
        self.metrics.latency_count += 1
        yield "", Completion(text.final, len(ids), len(new), finish)

    async def complete(self, ids: list[int], params: SamplingParams, stop: tuple[str, ...], clean: bool) -> Completion:
        async for _, done in self.stream(ids, params, stop, clean):
            if done is not None:
                return done
        raise AssertionError("the stream ended without a completion")

    # ----- endpoints

    def chat_prompt(self, messages: list[Message]) -> str:
        try:
            return self.chat_format.render([{"role": m.role, "content": m.content} for m in messages])
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from e

    async def chat_completion(self, request: ChatCompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        return await self._respond(request, self.chat_prompt(request.messages), chat=True)

    async def completion(self, request: CompletionRequest) -> dict | AsyncIterator[str]:
        self.check_model(request.model)
        return await self._respond(request, request.prompt, chat=False)

    async def _respond(self, request: SamplingFields, prompt: str, chat: bool) -> dict | AsyncIterator[str]:
        """Chat answers get ChatGLM's clean-up (as model.chat does); plain completions are raw text."""
        if (name := request.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server; send the request without it",
                           code="unsupported_parameter", param=name)
        ids = self.encode(prompt, request.max_tokens)
        params = [self.params(request, i) for i in range(request.n)]  # n choices: n requests, batched together
        stop = request.stop_strings()
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if request.stream:
            return self._sse(ids, params, stop, rid, created, chat=chat)
        dones = await asyncio.gather(*(self.complete(ids, p, stop, clean=chat) for p in params))
        kind = "chat.completion" if chat else "text_completion"
        choices = [{"index": i, **_choice_body(done.text, chat), "finish_reason": done.finish_reason}
                   for i, done in enumerate(dones)]
        return {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": choices,
                "usage": _usage(dones)}

    async def _sse(self, ids, params: list[SamplingParams], stop, rid: str, created: int,
                   chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                choice = {"index": index, "delta": body, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": rid, "object": kind, "created": created, "model": self.model_name, "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        if chat:
            for i in range(len(params)):
                yield chunk(i, None, None, first=True)
        streams = [self.stream(ids, p, stop, clean=chat) for p in params]
        async for i, (delta, done) in _merge(streams):
            yield chunk(i, delta, None) if done is None else chunk(i, None, done.finish_reason)
        yield "data: [DONE]\n\n"

    async def legacy(self, request: LegacyRequest) -> dict:
        """ChatGLM-6B's api.py: POST / {prompt, history, max_length, top_p, temperature}."""
        ids = self.encode(self.chat_format.prompt(request.prompt, request.history), None)
        if len(ids) >= request.max_length:
            raise APIError(400, f"the prompt has {len(ids)} tokens, which leaves no room under "
                                f"max_length={request.max_length}", param="max_length")
        params = SamplingParams(max_length=request.max_length, do_sample=request.temperature > 0,
                                temperature=request.temperature or 1.0, top_p=request.top_p, top_k=50,
                                **self.chat_format.sampling_ids(self.tokenizer))
        done = await self.complete(ids, params, (), clean=True)
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
