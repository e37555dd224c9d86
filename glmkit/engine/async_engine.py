"""The engine on a thread of its own, for an asyncio server.

One thread owns the Engine and the model; the event loop never touches a tensor. Requests and
aborts reach the thread through a command queue, and each request's tokens come back on its own
asyncio.Queue. When nothing is running the thread sleeps on the command queue.

Embedding requests go through the same thread (the model is never run from two threads): each is split into
batches (glmkit.generation.embed.plan_batches), and the loop runs one batch after each decoding step, so
generation goes on while a large embedding request is worked through.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from glmkit.engine.engine import Engine
from glmkit.engine.request import StepOutput
from glmkit.engine.scheduler import QueueFull
from glmkit.generation.embed import EMBED_BATCH_TOKENS, check_inputs, plan_batches
from glmkit.generation.sampling import SamplingParams

log = logging.getLogger("glmkit.engine")


@dataclass
class _Submit:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    outputs: asyncio.Queue
    accepted: asyncio.Future
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Embed:
    sequences: list[list[int]]
    result: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False  # set from the event loop when the caller went away: its batches are not run


@dataclass
class _EmbedJob:
    command: _Embed
    batches: deque[list[int]]  # the inputs' indices, one forward pass each, still to run
    vectors: list[list[float] | None]  # by input index, filled in as the batches run


class RequestOutputs:
    """An admitted request's step outputs, as an async iterator. aclose() before the last output aborts the
    request (as does dropping the object unclosed), so a slot is never held for a client that is gone."""

    def __init__(self, commands: queue.Queue, request_id: str, outputs: asyncio.Queue) -> None:
        self.commands, self.request_id, self.outputs = commands, request_id, outputs
        self.done = False

    def __aiter__(self) -> RequestOutputs:
        return self

    async def __anext__(self) -> StepOutput:
        if self.done:
            raise StopAsyncIteration
        output: StepOutput = await self.outputs.get()
        self.done = output.finish_reason is not None
        return output

    async def aclose(self) -> None:
        self._abort()

    def _abort(self) -> None:
        if not self.done:
            self.done = True
            self.commands.put(_Abort(self.request_id))

    def __del__(self) -> None:
        self._abort()


class AsyncEngine:
    def __init__(self, engine: Engine, embed_batch_tokens: int = EMBED_BATCH_TOKENS) -> None:
        self.engine = engine
        self.embed_batch_tokens = embed_batch_tokens  # padded tokens per embedding batch (one between steps)
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.embeddings: deque[_EmbedJob] = deque()  # admitted embedding requests, oldest first
        self.thread = threading.Thread(target=self._run, name="glmkit-engine", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.engine.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.running)

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     logprobs: int | None = None, prompt_logprobs: bool = False) -> RequestOutputs:
        """Admit a request and return its step outputs; raises ValueError / QueueFull if it is refused.

        The server admits before it answers, so that a refusal is an HTTP status, not a stream cut short.
        Closing the outputs before the last one (a client that went away) aborts the request and frees its slot."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self.commands.put(_Submit(prompt_ids, params, request_id, outputs, accepted, loop, logprobs, prompt_logprobs))
        try:
            await accepted  # raises the engine's refusal, if any
        except asyncio.CancelledError:  # the caller went away while the request was being admitted
            self.commands.put(_Abort(request_id))
            raise
        return RequestOutputs(self.commands, request_id, outputs)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        """submit, then the outputs (for callers that need no admission step of their own)."""
        outputs = await self.submit(prompt_ids, params, request_id)
        async with aclosing(outputs):
            async for output in outputs:
                yield output

    async def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """Unit-length embeddings of token-id inputs, in their order. Raises ValueError for an input the model
        cannot take (empty, too long, an id outside the vocabulary) and QueueFull when more than max_queue embedding
        requests already wait behind the one being run. Cancelling (a client gone) drops the batches not yet run."""
        loop = asyncio.get_running_loop()
        command = _Embed(sequences, loop.create_future(), loop)
        self.commands.put(command)
        try:
            return await command.result
        except asyncio.CancelledError:
            command.cancelled = True
            raise

    def _run(self) -> None:
        while True:
            block = not self.engine.has_work() and not self.embeddings
            try:
                while True:
                    self._handle(self.commands.get(block=block))
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a failed step must not hang its clients: fail them and go on
                    outputs = self._fail_running(e)
                for output in outputs:
                    self._deliver(output)
            if self.embeddings:
                self._embed_next_batch()

    def _fail_running(self, error: Exception) -> list[StepOutput]:
        """An unexpected failure outside any one request's step: the running batch ends with an error; the
        waiting requests, which took no part in it, stay queued."""
        log.exception("engine step failed: %s", error)
        return self.engine.fail_running()

    def _handle(self, command: _Submit | _Abort | _Embed) -> None:
        if isinstance(command, _Embed):
            self._admit_embedding(command)
            return
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self.streams.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.prompt_ids, command.params, command.request_id, command.logprobs,
                                    command.prompt_logprobs)
        except (ValueError, QueueFull) as e:
            command.loop.call_soon_threadsafe(_settle, command.accepted, e)
            return
        self.streams[command.request_id] = (command.loop, command.outputs)
        command.loop.call_soon_threadsafe(_settle, command.accepted, None)

    def _admit_embedding(self, command: _Embed) -> None:
        try:
            if len(self.embeddings) > self.engine.scheduler.max_queue:
                raise QueueFull(f"{len(self.embeddings) - 1} embedding requests are already waiting "
                                f"(max_queue {self.engine.scheduler.max_queue})")
            check_inputs(self.engine.model, command.sequences)
        except (ValueError, QueueFull) as e:
            command.loop.call_soon_threadsafe(_settle, command.result, e)
            return
        batches = deque(plan_batches([len(ids) for ids in command.sequences], self.embed_batch_tokens))
        self.embeddings.append(_EmbedJob(command, batches, [None] * len(command.sequences)))

    def _embed_next_batch(self) -> None:
        """Run the oldest embedding request's next batch; settle the request once its last batch has run."""
        job = self.embeddings[0]
        command = job.command
        if command.cancelled:
            self.embeddings.popleft()
            return
        rows = job.batches.popleft()
        try:
            vectors = self.engine.embed([command.sequences[i] for i in rows])
        except Exception as e:  # noqa: BLE001 (this request fails; generation and the other requests go on)
            log.exception("embedding a batch of %d inputs failed", len(rows))
            self.embeddings.popleft()
            error = RuntimeError(f"embedding failed on the server: {e}")
            command.loop.call_soon_threadsafe(_settle, command.result, error)
            return
        for i, vector in zip(rows, vectors, strict=True):
            job.vectors[i] = vector
        if not job.batches:
            self.embeddings.popleft()
            command.loop.call_soon_threadsafe(_settle, command.result, None, job.vectors)

    def _deliver(self, output: StepOutput) -> None:
        stream = self.streams.get(output.request_id)
        if stream is None:
            return
        loop, outputs = stream
        loop.call_soon_threadsafe(outputs.put_nowait, output)
        if output.finish_reason is not None:
            del self.streams[output.request_id]


def _settle(future: asyncio.Future, error: Exception | None, result: Any = None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
