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
