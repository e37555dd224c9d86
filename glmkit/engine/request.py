"""What the engine tracks per request, and what one step reports (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

from glmkit.generation.sampling import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: int  # new tokens allowed (max_new_tokens / max_length / context, decided at admission)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end token), "length" (budget), "abort", "error" (its step failed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None when the request ended without a new token (aborted, or its step failed)
    finish_reason: str | None
