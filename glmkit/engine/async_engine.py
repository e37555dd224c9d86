"""The engine on a thread of its own, for an asyncio server.

One thread owns the Engine and the model; the event loop never touches a tensor. Requests and
aborts reach the thread through a command queue, and each request's tokens come back on its own
asyncio.Queue. When nothing is running the thread sleeps on the command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from glmkit.engine.engine import Engine
from glmkit.engine.request import StepOutput
from glmkit.engine.scheduler import QueueFull
from glmkit.generation.sampling import SamplingParams


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
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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

    def _run(self) -> None:
        while True:
            block = not self.engine.has_work()
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

    def _fail_running(self, error: Exception) -> list[StepOutput]:
        """An unexpected failure outside any one request's step: the running batch ends with an error; the
        waiting requests, which took no part in it, stay queued."""
        logging.getLogger("glmkit.engine").exception("engine step failed: %s", error)
        scheduler = self.engine.scheduler
        requests = list(scheduler.running)
        scheduler.running.clear()
        return [StepOutput(r.request_id, None, "error") for r in requests]

    def _handle(self, command: _Submit | _Abort) -> None:
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

    def _deliver(self, output: StepOutput) -> None:
        stream = self.streams.get(output.request_id)
        if stream is None:
            return
        loop, outputs = stream
        loop.call_soon_threadsafe(outputs.put_nowait, output)
        if output.finish_reason is not None:
            del self.streams[output.request_id]


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
