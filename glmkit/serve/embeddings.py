"""POST /v1/embeddings in OpenAI's shape: the request and response schemas and the logic (no tensors here).

Strings are encoded as the tokenizer encodes a prompt (the family's special tokens included); token-id inputs are
taken as given. The engine client runs them in batches and pools them per family (glmkit.generation.embed). The
vectors come back as JSON floats or, with encoding_format "base64", as base64 of little-endian float32, which is
what the openai client decodes (it asks for base64 when no format is given).
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from glmkit.engine.scheduler import QueueFull
from glmkit.serve.openai import APIError, Serving, busy
from glmkit.serve.protocol import Checked

MAX_INPUTS = 2048  # inputs in one request (OpenAI's limit)
MAX_REQUEST_TOKENS = 300_000  # tokens summed over one request's inputs (OpenAI's limit)
SHAPES = ("must be a string, a list of strings, a list of token ids (integers from 0) or a list of lists of "
          "token ids")

TokenId = Annotated[int, Field(ge=0)]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


class EmbeddingRequest(Checked):
    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description=f"a text, a token-id list, or a list of 1 to {MAX_INPUTS} of either (one kind)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own (its hidden size) is served")
    user: str | None = None  # accepted, as OpenAI's, and not used

    @field_validator("input", mode="before")
    @classmethod
    def _one_of_the_shapes(cls, value: Any) -> Any:
        """One message for every wrong shape (pydantic's would list a failure per member of the union)."""
        if isinstance(value, str) or _is_token_list(value):
            return value
        if isinstance(value, list) and (all(isinstance(v, str) for v in value)
                                        or all(_is_token_list(v) for v in value)):
            return value
        raise ValueError(SHAPES)

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: of texts, or of token-id lists."""
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]
        return self.input


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Embeddings:
    """The endpoint over a Serving's engine client, tokenizer, model name and metrics; `size` is the model's hidden
    size, the length of every vector."""

    def __init__(self, serving: Serving, size: int) -> None:
        self.serving, self.size = serving, size

    async def create(self, request: EmbeddingRequest) -> dict:
        self.serving.check_model(request.model)
        if request.dimensions is not None and request.dimensions != self.size:
            raise APIError(400, f"dimensions {request.dimensions}: this model's embeddings have {self.size} (its "
                                "hidden size), and they are not truncated; send dimensions "
                                f"{self.size} or leave it out", param="dimensions")
        sequences = self.token_lists(request.inputs())
        tokens = sum(len(ids) for ids in sequences)
        if tokens > MAX_REQUEST_TOKENS:
            raise APIError(400, f"the inputs hold {tokens} tokens together; one request may hold at most "
                                f"{MAX_REQUEST_TOKENS}: split it", param="input")
        try:
            vectors = await self.serving.engine.embed(sequences)
        except QueueFull as e:
            raise busy(e) from e
        except ValueError as e:
            raise APIError(400, str(e), param="input") from e
        except RuntimeError as e:
            raise APIError(500, "embedding failed on the server; see its log", code="engine_error") from e
        self.serving.metrics.embedded(tokens)
        encode = _base64 if request.encoding_format == "base64" else list
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.serving.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def token_lists(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        """Each input's ids; a 400 naming the first empty one, or the count over MAX_INPUTS."""
        if not inputs:
            raise APIError(400, f"input is an empty list: send 1 to {MAX_INPUTS} inputs", param="input")
        if len(inputs) > MAX_INPUTS:
            raise APIError(400, f"input holds {len(inputs)} inputs; one request may hold at most {MAX_INPUTS}: "
                                "split it", param="input")
        for i, item in enumerate(inputs):
            if not item:
                raise APIError(400, f"input {i} is empty: every input needs text or token ids", param="input")
        return [self.serving.tokenizer.encode(item) if isinstance(item, str) else item for item in inputs]


def _base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64: what the openai client decodes (numpy's float32 on every platform it
    runs on)."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")
