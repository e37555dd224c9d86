"""What the engine tracks per request, and what one step reports (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glmkit.generation.sampling import SamplingParams

if TYPE_CHECKING:  # no torch here (the server's protocol imports this module)
    from glmkit.generation.constraints import Matcher


@dataclass
class TokenLogprob:
    """A token's log-probability under the scores it was sampled from, and the `top` most likely (id, logprob)
    alternatives of that same distribution, most likely first (tokens the sampler could not pick, -inf, left out)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: int  # new tokens allowed (max_new_tokens / max_length / context, decided at admission)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end token), "length" (budget), "abort", "error" (its step failed)
    logprobs: int | None = None  # None: no log-probabilities; k: each new token's, with its k most likely rivals
    prompt_logprobs: bool = False  # also the prompt's tokens' (causal models only), on the first output
    constraint: Matcher | None = None  # its walk through params.grammar: masks each token, ends it once complete
    # Its place in the paged KV cache (glmkit.engine.scheduler): the blocks it holds, the tokens whose keys and
    # values they hold, and what admission gave it to encode (its prompt; after a preemption, its reply so far too).
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    prefill_ids: list[int] = field(default_factory=list)
    preempted: bool = False  # was preempted at least once (and recomputed)
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission (None: no lookup)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def encoded(self) -> bool:
        """Admitted and its prompt encoded: it decodes from now on."""
        return bool(self.prefill_ids) and self.computed >= len(self.prefill_ids)


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when the request ended without a new token (aborted, or its step failed)
    finish_reason: str | None
    logprob: TokenLogprob | None = None  # when the request asked for logprobs and a token was produced
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; the first prompt token's is None
    cached_tokens: int | None = None  # first output only: prompt tokens copied from the prefix cache (None: no lookup)
