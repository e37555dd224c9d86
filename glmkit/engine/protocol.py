"""What the server needs of an engine, so that it depends on this interface and not on AsyncEngine.

No torch here: `glmkit.serve.openai` is typed against `EngineClient`, and AsyncEngine (the engine on its
own thread) is the implementation the app builds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from glmkit.engine.request import StepOutput
from glmkit.generation.sampling import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        ...

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        ...

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     logprobs: int | None = None, prompt_logprobs: bool = False) -> AsyncIterator[StepOutput]:
        """Admit the request; raises ValueError / QueueFull if it is refused, else returns its step outputs
        as they come (an async iterator with aclose). `logprobs` k: each output carries its token's
        log-probability and k alternatives (StepOutput.logprob); `prompt_logprobs`: the first output also carries
        the prompt tokens' (StepOutput.prompt_logprobs; causal models only, else ValueError).

        Closing the outputs before the last one aborts the request and frees its slot."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        """submit, then the outputs: for callers that need no admission step of their own."""
        ...

    async def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """Unit-length embeddings of token-id inputs, in their order (pooled per family: glmkit.generation.embed);
        raises ValueError for an input the model cannot take, naming its index, and QueueFull when too many
        embedding requests wait. Cancelling drops the batches not yet run."""
        ...
