"""The engine loop: schedule -> one forward pass -> update requests; a token per decoding request a step.

The KV cache is paged (glmkit.models.paged, glmkit.engine.blocks): a pool of `BLOCK_SIZE`-token blocks sized by
kv_cache_mb, from which the scheduler gives each request the blocks it needs as it grows.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch

from glmkit.engine.blocks import BlockAllocator
from glmkit.engine.parallel import BroadcastRunner
from glmkit.engine.prefix_cache import BLOCK_SIZE, DEFAULT_PREFIX_CACHE_MB, PrefixCache
from glmkit.engine.request import Request, StepOutput, TokenLogprob
from glmkit.engine.runner import DecodeRow, ModelRunner, PromptChunk, pool_size
from glmkit.engine.scheduler import DEFAULT_STEP_TOKENS, Schedule, Scheduler
from glmkit.generation.generate import end_tokens, keeps_prefix
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

log = logging.getLogger("glmkit.engine")
MAX_LOGPROBS = 20  # the most alternatives a token's logprobs may list (OpenAI's limit)


class Engine:
    """Continuous batching over one model: `add_request`, then call `step` until `has_work` is False.

    kv_cache_mb: the pool of KV-cache blocks that running requests take from (default: room for max_batch requests
    of max_length tokens; the memory is backed as blocks are first used); a request that cannot get blocks waits,
    and a causal model's running request may be preempted and recomputed. prefix_cache_mb: how many of the pool's
    blocks, on top, may stay behind for later prompts that start the same way (glmkit.engine.prefix_cache); 0 turns
    it off. step_tokens: the tokens one step may encode (the decode tokens and prompt chunks), so a long prompt
    is encoded in chunks between the running requests' tokens. kv_dtype: the cache's dtype (default: the model's).
    """

    def __init__(self, model: GLM, max_batch: int = 8, max_queue: int = 64, max_length: int | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, kv_cache_mb: float | None = None,
                 step_tokens: int = DEFAULT_STEP_TOKENS, kv_dtype: torch.dtype | str | None = None) -> None:
        self.model = model
        kv_dtype = getattr(torch, kv_dtype) if isinstance(kv_dtype, str) else kv_dtype
        self.max_length = max_length or model.config.max_sequence_length
        num_blocks, prefix_blocks = pool_size(model, max_batch, self.max_length, prefix_cache_mb, kv_cache_mb,
                                              kv_dtype)
        blocks = BlockAllocator(num_blocks, BLOCK_SIZE)
        prefix_cache = None
        if prefix_blocks:
            prefix_cache = PrefixCache(prefix_blocks, BLOCK_SIZE, release=lambda block: blocks.release([block]))
        self.scheduler = Scheduler(max_batch, max_queue, blocks, prefix_cache, step_tokens,
                                   chunked=keeps_prefix(model.position_layout))
        # Under tensor parallelism (rank 0 only builds an Engine), every model call reaches all ranks.
        runner = BroadcastRunner if getattr(model, "tp_world", 1) > 1 else ModelRunner
        self.runner = runner(model, max_batch, num_blocks, BLOCK_SIZE, kv_dtype)
        self._ids = itertools.count()

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.scheduler.prefix_cache

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    logprobs: int | None = None, prompt_logprobs: bool = False) -> Request:
        """Queue a request; raises ValueError for a prompt that cannot fit, QueueFull when the queue is full.

        logprobs k (0..MAX_LOGPROBS): every output carries its token's log-probability under the scores that
        sampled it and the k most likely tokens of those scores; prompt_logprobs: the first output also carries
        each prompt token's, which only a causal model has (a prefix-LM reads its prompt both ways)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be from 0 to {MAX_LOGPROBS}, got {logprobs}")
        if prompt_logprobs and not self.model.config.causal:
            raise ValueError("prompt log-probabilities (echo with logprobs) need a causal model (ChatGLM2 and later): "
                             "this model reads its prompt bidirectionally, so its prompt tokens have none")
        budget = params.new_token_budget(len(prompt_ids), self.max_length)
        request = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, budget,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=self._constraint(params))
        self.scheduler.add(request)
        return request

    def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """One batch of checked inputs' unit-length embeddings, run between steps (under --tp on every rank)."""
        return self.runner.embed(sequences)

    def _constraint(self, params: SamplingParams):
        """A Matcher of its own for a request with a grammar. Under --tp the other ranks' runners would need the
        tokenizer's grammar tables too, which they do not have: refused."""
        if params.grammar is None:
            return None
        if isinstance(self.runner, BroadcastRunner):
            raise ValueError("structured output (a grammar) is not supported under tensor parallelism (--tp) yet")
        return params.grammar.matcher(end_tokens(self.model, params))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> StepOutput | None:
        """Drop a request now (a client went away): a waiting one leaves the queue, a running one its slot."""
        request = self.scheduler.abort_waiting(request_id) or self.scheduler.find_running(request_id)
        if request is None:
            return None
        request.finish_reason = "abort"
        if request in self.scheduler.running:
            self._release(request)
        else:
            self.runner.forget(request_id)
        return StepOutput(request_id, None, "abort")

    def fail_running(self) -> list[StepOutput]:
        """End every running request with an error (a step failed outside any one request), freeing its blocks;
        the waiting ones stay queued."""
        requests = list(self.scheduler.running)
        for request in requests:
            request.finish_reason = "error"
            self._release(request)
        return [StepOutput(r.request_id, None, "error") for r in requests]

    def step(self) -> list[StepOutput]:
        """One forward pass: a token for every decoding request, and prompt chunks (the first token of a request
        once its prompt is complete). A request whose sampling fails ends with finish_reason "error" and
        leaves the batch; the others go on. Only a failed forward pass, which every request in it shares, fails
        all of them."""
        plan = self.scheduler.schedule()
        self._start(plan)
        rows = [DecodeRow(slot, r.output_ids[-1], r.computed, r.blocks, r.params) for slot, r in plan.decoding]
        work = [PromptChunk(c.slot, c.request.prefill_ids, c.start, c.stop, c.request.blocks, c.request.params,
                            sample=c.completes and not c.request.output_ids, prompt_logprobs=c.request.prompt_logprobs)
                for c in plan.chunks]
        try:
            tokens, firsts = self.runner.step(rows, work)
            failed = False
        except Exception:  # noqa: BLE001 (the shared forward pass failed: these requests cannot go on)
            log.exception("model step of %d requests failed", len(rows) + len(work))
            tokens, firsts, failed = [None] * len(rows), [None] * len(work), True
        produced: list[tuple[Request, int | None, TokenLogprob | None]] = []
        for (slot, request), token in zip(plan.decoding, tokens, strict=True):
            request.computed += 1
            produced.append((request, token, self.runner.logprobs[slot]))
        for chunk, job, first in zip(plan.chunks, work, firsts, strict=True):
            if not failed:
                self.scheduler.encoded(chunk)
            if job.sample or failed:  # its first token, or its end with an error
                produced.append((chunk.request, first, self.runner.logprobs[chunk.slot]))
        outputs = [self._output(request, token, logprob) for request, token, logprob in produced]
        for request, _, _ in produced:
            if request.finished:
                self._release(request)
        return outputs

    def _start(self, plan: Schedule) -> None:
        """The runner's side of the plan before the forward pass: preempted requests' state kept, admitted ones'
        set up, new blocks zeroed (or copied from a cached block that a prompt ends in)."""
        for slot, request in plan.preempted:
            self.runner.suspend(slot, request.request_id)
        for slot, request in plan.admitted:
            self.runner.admit(slot, request.request_id, request.prompt_ids, request.output_ids, request.params,
                              request.logprobs, request.constraint)
        self.runner.zero_blocks(plan.fresh_blocks)
        self.runner.copy_blocks(plan.copies)

    def _output(self, request: Request, token: int | None, logprob: TokenLogprob | None) -> StepOutput:
        first = not request.output_ids
        if token is None:
            request.finish_reason = "error"
        else:
            request.output_ids.append(token)
            request.finish_reason = self._finish_reason(request, token)
        slot = self.scheduler.running.index(request)
        prompt_logprobs = self.runner.prompt_logprobs[slot] if first and request.prompt_logprobs else None
        return StepOutput(request.request_id, token, request.finish_reason, logprob if token is not None else None,
                          prompt_logprobs, request.cached_tokens if first else None)

    def _finish_reason(self, request: Request, token: int) -> str | None:
        eos = end_tokens(self.model, request.params)
        if token in eos or (request.constraint is not None and request.constraint.finished):
            return "stop"  # an end token, or a complete answer to a grammar (nothing else may follow)
        if len(request.output_ids) >= request.budget:
            return "length"
        return None

    def _release(self, request: Request) -> None:
        """Free the request's slot and blocks; the prefix cache keeps its full blocks first, unless its step
        failed."""
        move = self.scheduler.finish(request, keep=request.finish_reason != "error")
        if move is not None:
            self.runner.move(*move)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """One request, run to the end on its own (convenient for scripts and tests)."""
        request = self.add_request(prompt_ids, params)
        while not request.finished:
            for output in self.step():
                if output.request_id == request.request_id and output.token_id is not None:
                    yield output.token_id
