"""The engine loop: schedule -> run the model -> update requests, one token per running request a step."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

from glmkit.engine.parallel import BroadcastRunner
from glmkit.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from glmkit.engine.request import Request, StepOutput, TokenLogprob
from glmkit.engine.runner import ModelRunner
from glmkit.engine.scheduler import Scheduler
from glmkit.generation.generate import end_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

log = logging.getLogger("glmkit.engine")
MAX_LOGPROBS = 20  # the most alternatives a token's logprobs may list (OpenAI's limit)


class Engine:
    """Continuous batching over one model: `add_request`, then call `step` until `has_work` is False.

    prefix_cache_mb: room for the keys and values of earlier prompts' blocks, which a causal model's later prompts
    that start the same way copy instead of computing (glmkit.engine.prefix_cache); 0 turns it off."""

    def __init__(self, model: GLM, max_batch: int = 8, max_queue: int = 64, max_length: int | None = None,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB) -> None:
        self.model = model
        self.max_length = max_length or model.config.max_sequence_length
        self.scheduler = Scheduler(max_batch, max_queue)
        # Under tensor parallelism (rank 0 only builds an Engine), every model call reaches all ranks.
        runner = BroadcastRunner if getattr(model, "tp_world", 1) > 1 else ModelRunner
        self.runner = runner(model, max_batch, self.max_length, prefix_cache_mb)
        self._ids = itertools.count()

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
        return StepOutput(request_id, None, "abort")

    def step(self) -> list[StepOutput]:
        """One token for every running request. A request whose step fails (its prefill, its sampling) ends
        with finish_reason "error" and leaves the batch; the others go on. Only a failed forward pass of the
        decoding batch, which every decoding request shares, fails all of them."""
        plan = self.scheduler.schedule()
        produced: list[tuple[Request, int | None]] = []
        logprobs: dict[str, TokenLogprob | None] = {}
        prompt_logprobs: dict[str, list] = {}
        cached: dict[str, int | None] = {}  # admitted requests' prompt tokens from the prefix cache
        if plan.decoding:
            try:
                tokens = self.runner.decode([r.output_ids[-1] for r in plan.decoding],
                                            [r.params for r in plan.decoding])
            except Exception:  # noqa: BLE001 (the shared forward pass failed: these requests cannot go on)
                log.exception("decoding step of %d requests failed", len(plan.decoding))
                tokens = [None] * len(plan.decoding)
            produced += zip(plan.decoding, tokens, strict=True)
            for row, request in enumerate(plan.decoding):
                logprobs[request.request_id] = self.runner.logprobs[row]
        for slot, request in plan.admitted:
            try:
                token = self.runner.prefill(slot, request.prompt_ids, request.params, request.logprobs,
                                            request.prompt_logprobs, request.constraint)
            except Exception:  # noqa: BLE001 (this request's own failure)
                log.exception("prefill of request %s failed", request.request_id)
                token = None
            else:
                logprobs[request.request_id] = self.runner.logprobs[slot]
                cached[request.request_id] = self.runner.cached_tokens
                if request.prompt_logprobs:
                    prompt_logprobs[request.request_id] = self.runner.prompt_logprobs
            produced.append((request, token))
        outputs = []
        for request, token in produced:
            if token is None:
                request.finish_reason = "error"
            else:
                request.output_ids.append(token)
                request.finish_reason = self._finish_reason(request, token)
            outputs.append(StepOutput(request.request_id, token, request.finish_reason,
                                      logprobs.get(request.request_id) if token is not None else None,
                                      prompt_logprobs.get(request.request_id), cached.get(request.request_id)))
        for request, _ in produced:
            if request.finished:
                self._release(request)
        return outputs

    def _finish_reason(self, request: Request, token: int) -> str | None:
        eos = end_tokens(self.model, request.params)
        if token in eos or (request.constraint is not None and request.constraint.finished):
            return "stop"  # an end token, or a complete answer to a grammar (nothing else may follow)
        if len(request.output_ids) >= request.budget:
            return "length"
        return None

    def _release(self, request: Request) -> None:
        """Free the request's slot; what its cache holds goes to the prefix cache first, unless its step failed."""
        if self.runner.prefix_cache is not None and request.finish_reason != "error":
            self.runner.keep(self.scheduler.running.index(request), [*request.prompt_ids, *request.output_ids])
        move = self.scheduler.finish(request)
        if move is not None:
            self.runner.move(*move)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """One request, run to the end on its own (convenient for scripts and tests)."""
        request = self.add_request(prompt_ids, params)
        while not request.finished:
            for output in self.step():
                if output.request_id == request.request_id and output.token_id is not None:
                    yield output.token_id
