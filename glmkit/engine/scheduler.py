"""Continuous-batching policy: who runs this step, and which KV blocks each request holds. No torch here, so it is
tested on its own.

Running requests occupy slots 0..n-1 of the runner's per-request state, in order; a request that finishes frees
its slot by moving the last running request into it (only that small state moves: its keys and values stay in
their blocks). Each step every running request whose prompt is encoded feeds its latest token (decoding), and
prompts are encoded with what is left of the step's token budget, in chunks where the model allows it:

    step:  [decode tokens of the running requests | prompt chunks]   <= step_tokens tokens in all

so a long prompt no longer stalls every stream for its whole prefill, and many short prompts that arrive together
are encoded together. A prompt being encoded goes on first; then waiting requests are admitted, oldest first,
while a slot is free, the budget lasts and the pool has the blocks their prompts need (after the prefix cache's
longest hit, whose blocks they share). A prompt that starts with the same block as one admitted in this step waits
for the next, when that one's blocks are in the prefix cache. A decoding request takes a new block when it fills
its last one; when none is free (and the prefix cache holds none that only it holds), the request in the last
slot is preempted: its blocks are freed and it waits at the head of the queue, to be recomputed by encoding its
prompt and its reply so far, after which it goes on exactly where it stopped.

Prefix-LM models (ChatGLM-6B, GLM-130B) read the whole prompt bidirectionally: their prompt is encoded in one
piece, a reply cannot be recomputed by continuing the prompt, and so each of their requests takes the blocks of
its whole budget (prompt and every new token) at admission and is never preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glmkit.engine.blocks import BlockAllocator, blocks_for
from glmkit.engine.prefix_cache import PrefixCache, block_keys
from glmkit.engine.request import Request

DEFAULT_STEP_TOKENS = 256  # tokens one step may encode: decode tokens plus prompt chunks


class QueueFull(RuntimeError):
    """More requests are waiting than the queue may hold: the caller should retry later (HTTP 429)."""


@dataclass
class Chunk:
    """Encode request.prefill_ids[start:stop] in its slot; the prompt is complete when stop == len(prefill_ids)."""

    slot: int
    request: Request
    start: int
    stop: int

    @property
    def completes(self) -> bool:
        return self.stop == len(self.request.prefill_ids)


@dataclass
class Schedule:
    preempted: list[tuple[int, Request]] = field(default_factory=list)  # left their slots (in this order)
    admitted: list[tuple[int, Request]] = field(default_factory=list)  # (slot, request) joining this step
    decoding: list[tuple[int, Request]] = field(default_factory=list)  # (slot, request) feeding their latest token
    chunks: list[Chunk] = field(default_factory=list)  # the prompt chunks encoded this step
    fresh_blocks: list[int] = field(default_factory=list)  # blocks handed out this step (to be zeroed)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (cached block, fresh block) to copy, after zeroing


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, blocks: BlockAllocator | None = None,
                 prefix_cache: PrefixCache | None = None, step_tokens: int = DEFAULT_STEP_TOKENS,
                 chunked: bool = True) -> None:
        """chunked: prompts may be encoded in pieces and replies recomputed (causal models); False: prefix-LM
        models, whose requests reserve their whole budget's blocks (see the module docstring)."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.blocks = blocks or BlockAllocator(1 + max_batch * 128, 16)
        self.prefix_cache = prefix_cache
        self.step_tokens, self.chunked = step_tokens, chunked
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0  # requests preempted so far (for /metrics and tests)

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def blocks_needed(self, request: Request) -> int:
        """The most blocks `request` can ever hold at once: its prompt and every token of its budget."""
        return blocks_for(len(request.prompt_ids) + request.budget, self.block_size)

    def add(self, request: Request) -> None:
        """Queue a request; ValueError if the pool could never hold it, QueueFull when the queue is full."""
        needed, usable = self.blocks_needed(request), self.blocks.usable
        if needed > usable:
            raise ValueError(f"this request needs {needed} KV-cache blocks of {self.block_size} tokens (prompt and "
                             f"max_new_tokens) and the pool has {usable}: shorten it or give the engine a larger "
                             "KV cache (--kv-cache-mb)")
        free_slots = self.max_batch - len(self.running)
        if len(self.waiting) >= self.max_queue + free_slots:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue {self.max_queue})")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        plan = Schedule()
        self._grow_decoding(plan)
        plan.decoding = [(slot, r) for slot, r in enumerate(self.running) if r.encoded]
        budget = self.step_tokens - len(plan.decoding)
        for slot, request in enumerate(self.running):
            if not request.encoded:
                budget -= self._chunk(plan, slot, request, budget)
        first_keys = set()  # the first block of each prompt admitted this step
        while (budget > 0 or not plan.chunks) and self.waiting and len(self.running) < self.max_batch \
                and not plan.preempted:
            request = self._admit(plan, first_keys)
            if request is None:
                break
            budget -= self._chunk(plan, len(self.running) - 1, request, budget)
        return plan

    def _chunk(self, plan: Schedule, slot: int, request: Request, budget: int) -> int:
        """Plan the next chunk of `request`'s prompt within `budget` tokens (at least a block, so that every step
        moves a prompt on; a prefix-LM prompt whole); returns its length."""
        start, stop = request.computed, len(request.prefill_ids)
        if self.chunked:
            stop = min(stop, start + max(budget, self.block_size))
        plan.chunks.append(Chunk(slot, request, start, stop))
        return stop - start

    def _grow_decoding(self, plan: Schedule) -> None:
        """A block for each decoding request whose next token starts one, preempting from the last slot when the
        pool has none."""
        slot = 0
        while slot < len(self.running):
            request = self.running[slot]
            if request.encoded and request.computed >= len(request.blocks) * self.block_size:
                block = self._take(1)
                if block is None:
                    plan.preempted.append(self._preempt())
                    continue  # the same slot again (unless it was the one preempted: then the loop ends)
                request.blocks += block
                plan.fresh_blocks += block
            slot += 1

    def _preempt(self) -> tuple[int, Request]:
        request = self.running.pop()
        self.blocks.release(request.blocks)
        request.blocks, request.computed, request.prefill_ids = [], 0, []
        request.preempted = True
        self.waiting.appendleft(request)
        self.preemptions += 1
        return len(self.running), request

    def _admit(self, plan: Schedule, first_keys: set[bytes]) -> Request | None:
        """The head of the queue, with the blocks of its prompt (shared ones from the prefix cache first), or None
        (it stays first in the queue) while the pool cannot give them, or while a prompt admitted in this step
        starts with the same block (next step, its blocks are in the prefix cache)."""
        request = self.waiting[0]
        ids = [*request.prompt_ids, *request.output_ids[:-1]]  # a preempted request re-encodes its reply too
        keys = [] if self.prefix_cache is None or request.prompt_logprobs else block_keys(ids, self.block_size)
        if keys and keys[0] in first_keys:
            return None
        hits = self.prefix_cache.lookup(keys) if keys else []
        # The last token is encoded again for its logits: when its block is cached too, the request gets a copy of
        # that block to write into (copy on write) and shares the blocks before it.
        last = (len(ids) - 1) // self.block_size
        shared, copied = hits[:last], hits[last:last + 1]
        tokens = len(ids) if self.chunked else len(request.prompt_ids) + request.budget
        self.blocks.share([*shared, *copied])  # before _take, which may evict what only the prefix cache holds
        fresh = self._take(blocks_for(tokens, self.block_size) - len(shared))
        self.blocks.release(copied)
        if fresh is None:
            self.blocks.release(shared)
            return None
        self.waiting.popleft()
        request.blocks = [*shared, *fresh]
        request.prefill_ids = ids
        request.computed = len(ids) - 1 if copied else len(shared) * self.block_size
        plan.copies += zip(copied, fresh[:1], strict=False)
        first_keys.update(keys[:1])
        request.cached_tokens = None if self.prefix_cache is None or request.prompt_logprobs else request.computed
        if request.cached_tokens is not None:
            self.prefix_cache.count(len(ids), request.computed)
        plan.fresh_blocks += fresh
        plan.admitted.append((len(self.running), request))
        self.running.append(request)
        return request

    def _take(self, count: int) -> list[int] | None:
        """`count` free blocks, evicting blocks only the prefix cache holds if need be; None if still short."""
        short = count - len(self.blocks.free)
        if short > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict_unshared(short, lambda block: self.blocks.holders[block] == 1)
        return self.blocks.allocate(count)

    def encoded(self, chunk: Chunk) -> None:
        """The chunk ran: once the prompt is complete, the prefix cache takes its full blocks."""
        request = chunk.request
        request.computed = chunk.stop
        if chunk.completes:
            self._keep_blocks(request, request.prefill_ids)

    def _keep_blocks(self, request: Request, ids: list[int]) -> None:
        """The prefix cache takes the full blocks of `ids` (held in request.blocks) that it lacks."""
        if self.prefix_cache is not None:
            keys = block_keys(ids[:request.computed], self.block_size)
            self.prefix_cache.insert(keys, lambda i: self._shared(request.blocks[i]))

    def _shared(self, block: int) -> int:
        self.blocks.share([block])
        return block

    def finish(self, request: Request, keep: bool = True) -> tuple[int, int] | None:
        """Free the request's slot and blocks (the prefix cache keeping the full blocks of its prompt and reply
        first, unless keep is False: a failed step); returns the (from, to) slot move that keeps the batch
        contiguous."""
        if keep:
            self._keep_blocks(request, [*request.prompt_ids, *request.output_ids])
        self.blocks.release(request.blocks)
        request.blocks = []
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
