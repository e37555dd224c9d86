"""Request and response shapes of the OpenAI-compatible API (the subset glmkit serves)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    user: str | None = None
    n: int = Field(1, ge=1, le=16)
    # Accepted only at their no-op values: a request that needs them is refused (`unsupported`), not
    # silently answered without them.
    logprobs: bool | int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first option this server cannot honour, if any."""
        if self.logprobs:
            return "logprobs"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        return "logit_bias" if self.logit_bias else None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


class LegacyRequest(BaseModel):
    """The original ChatGLM-6B api.py request."""

    prompt: str
    history: list[tuple[str, str]] = Field(default_factory=list)
    max_length: int = Field(2048, ge=1)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    temperature: float = Field(0.95, ge=0.0, le=2.0)
