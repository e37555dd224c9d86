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


@dataclass
class _Abort:
    request_id: str


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

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        """Yield the request's step outputs; raises ValueError / QueueFull if it is refused.

        Closing the iterator early (a client that went away) aborts the request and frees its slot."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self.commands.put(_Submit(prompt_ids, params, request_id, outputs, accepted, loop))
        await accepted  # raises the engine's refusal, if any
        finished = False
        try:
            while not finished:
                output: StepOutput = await outputs.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.commands.put(_Abort(request_id))

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
                except Exception as e:  # a failed step must not hang every client: fail them and go on
                    outputs = self._fail_all(e)
                for output in outputs:
                    self._deliver(output)

    def _fail_all(self, error: Exception) -> list[StepOutput]:
        logging.getLogger("glmkit.engine").exception("engine step failed: %s", error)
        scheduler = self.engine.scheduler
        requests = [*scheduler.running, *scheduler.waiting]
        scheduler.running.clear()
        scheduler.waiting.clear()
        return [StepOutput(r.request_id, None, "error") for r in requests]

    def _handle(self, command: _Submit | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self.streams.pop(command.request_id, None)
            return
        try:
            self.engine.add_request(command.prompt_ids, command.params, command.request_id)
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
