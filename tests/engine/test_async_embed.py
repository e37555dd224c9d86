"""Embedding requests through the engine's thread (AsyncEngine.embed) on a real tiny model: the vectors the
Python API gives, in batches run between decoding steps, without disturbing the requests being decoded."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from glmkit.engine import Engine, QueueFull
from glmkit.engine.async_engine import AsyncEngine
from glmkit.generation.embed import embed
from glmkit.generation.generate import stream_tokens
from glmkit.generation.sampling import SamplingParams

from tiny import prompt, random_model, tiny_config

INPUTS = [prompt(*range(5, 5 + n)) for n in (12, 3, 30, 7, 1, 18, 9, 25)]


class RecordingEngine(Engine):
    """The real engine, noting the order of its steps and embedding batches; `gate` (when set up) holds each
    embedding batch until the test opens it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def step(self):
        self.calls.append("step")
        return super().step()

    def embed(self, sequences):
        self.calls.append("embed")
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        return super().embed(sequences)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(eos_token_id=255))


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, timeout=120))


async def rest_of(stream) -> list[int]:
    return [out.token_id async for out in stream]


def test_embeddings_between_steps_equal_the_python_api_and_leave_decoding_alone(model):
    # 300 tokens each (the end token is banned before): after both streams' first token, far more steps remain
    # than there are embedding batches, however fast or loaded the machine is.
    params = SamplingParams(max_new_tokens=300, min_new_tokens=300)
    prompts = [prompt(7, 8, 9), prompt(*range(20, 31))]
    alone = [[int(t[0]) for t in stream_tokens(model, [ids], params)] for ids in prompts]
    want = embed(model, INPUTS)
    engine = RecordingEngine(model, max_batch=2)
    client = AsyncEngine(engine, embed_batch_tokens=40)  # one or two inputs per batch: several batches

    async def together():
        streams = [client.generate(ids, params, f"r{i}") for i, ids in enumerate(prompts)]
        firsts = [(await anext(stream)).token_id for stream in streams]  # both are decoding now
        vectors = await client.embed(INPUTS)
        rests = await asyncio.gather(*(rest_of(stream) for stream in streams))
        return vectors, [[first, *rest] for first, rest in zip(firsts, rests, strict=True)]

    vectors, tokens = run(together())
    assert tokens == alone
    torch.testing.assert_close(torch.tensor(vectors), want, rtol=0, atol=1e-5)
    first, last = engine.calls.index("embed"), len(engine.calls) - 1 - engine.calls[::-1].index("embed")
    assert engine.calls.count("embed") >= 5
    assert "step" in engine.calls[first:last]  # decoding went on between the batches


def test_inputs_the_model_cannot_take_are_refused_before_any_batch(model):
    engine = RecordingEngine(model)
    client = AsyncEngine(engine)
    with pytest.raises(ValueError, match="input 1 has 200 tokens, more than the model's context of 96"):
        run(client.embed([[5], list(range(3, 203))]))
    with pytest.raises(ValueError, match="input 0 holds token id 999"):
        run(client.embed([[999]]))
    assert engine.calls.count("embed") == 0


def test_more_waiting_embeddings_than_max_queue_are_refused(model):
    engine = RecordingEngine(model, max_queue=0)
    engine.gate = threading.Event()
    client = AsyncEngine(engine, embed_batch_tokens=40)

    async def two():
        first = asyncio.ensure_future(client.embed(INPUTS))
        await asyncio.to_thread(engine.entered.wait, 30)  # the first is being run, its batch held
        second = asyncio.ensure_future(client.embed([[5, 6]]))
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = run(two())
    assert isinstance(second, QueueFull) and "max_queue 0" in str(second)
    assert len(first) == len(INPUTS)


def test_a_cancelled_request_runs_no_more_batches(model):
    engine = RecordingEngine(model)
    engine.gate = threading.Event()
    client = AsyncEngine(engine, embed_batch_tokens=40)

    async def cancel_then_embed():
        first = asyncio.ensure_future(client.embed(INPUTS))
        await asyncio.to_thread(engine.entered.wait, 30)
        first.cancel()
        await asyncio.sleep(0.05)
        engine.gate.set()
        return await client.embed([[5, 6]])

    (vector,) = run(cancel_then_embed())
    assert engine.calls.count("embed") == 2  # the cancelled request's first batch, then the next request's
    torch.testing.assert_close(torch.tensor(vector), embed(model, [[5, 6]])[0], rtol=0, atol=1e-5)


def test_a_failing_batch_fails_its_request_alone(model, monkeypatch):
    engine = RecordingEngine(model)
    client = AsyncEngine(engine)
    real = engine.runner.embed
    monkeypatch.setattr(engine.runner, "embed", lambda sequences: 1 / 0)
    with pytest.raises(RuntimeError, match="embedding failed on the server: division by zero"):
        run(client.embed([[5, 6]]))
    monkeypatch.setattr(engine.runner, "embed", real)
    assert len(run(client.embed([[5, 6]]))) == 1
