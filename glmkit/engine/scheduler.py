"""Continuous-batching policy: who runs this step. No torch here, so it is tested on its own.

Running requests occupy slots 0..n-1 of the model's KV cache, in order. A request that finishes
frees its slot by moving the last running request into it, so the running batch is always the
first n slots and the runner decodes a contiguous view of the cache. Waiting requests join, oldest
first, whenever a slot is free; there is no separate prefill or decode phase.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from glmkit.engine.request import Request


class QueueFull(RuntimeError):
    """More requests are waiting than the queue may hold: the caller should retry later (HTTP 429)."""


@dataclass
class Schedule:
    admitted: list[tuple[int, Request]]  # (slot, request) to prefill this step
    decoding: list[Request]  # requests in slots 0..len-1 that continue this step (admitted ones excluded)


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        free_slots = self.max_batch - len(self.running)
        if len(self.waiting) >= self.max_queue + free_slots:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        decoding = list(self.running)
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            admitted.append((len(self.running), request))
            self.running.append(request)
        return Schedule(admitted, decoding)

    def finish(self, request: Request) -> tuple[int, int] | None:
        """Free the request's slot; returns the (from, to) slot move that keeps the batch contiguous."""
        slot = self.running.index(request)
        last = len(self.running) - 1
        self.running[slot] = self.running[last]
        self.running.pop()
        return (last, slot) if slot != last else None

    def abort_waiting(self, request_id: str) -> Request | None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        return None

    def find_running(self, request_id: str) -> Request | None:
        return next((r for r in self.running if r.request_id == request_id), None)
