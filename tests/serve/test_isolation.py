"""One request's trouble is its own: a request whose step fails inside the engine, or whose client goes away,
ends alone and frees its slot. The server runs in this process (uvicorn on a thread, on loopback) so that
the tests can reach into the engine: make one request's sampling raise, slow the model down, and read the
engine's running count."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

import glmkit
from glmkit.engine.runner import ModelRunner
from glmkit.serve.app import create_app

POISON = 424242  # the seed of the request whose sampling the tests make fail


@pytest.fixture(scope="module")
def inproc(model_dir):
    """(base URL, the AsyncEngine) of a server in this process over its own copy of the tiny model."""
    model, tokenizer = glmkit.load(model_dir, progress=False)
    app = create_app(model, tokenizer, model_dir.name, max_batch=4, max_queue=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.serving.engine
    server.should_exit = True
    thread.join(timeout=30)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_a_request_whose_sampling_fails_ends_alone_and_a_concurrent_stream_finishes(inproc, model_dir, monkeypatch):
    base, engine = inproc
    original = ModelRunner._sample
    sampled: dict[int, int] = {}
    running_when_failed: list[int] = []

    def failing_for_the_poisoned_request(self, slot, logits, params):
        if params.seed == POISON:
            sampled[id(params)] = sampled.get(id(params), 0) + 1
            if sampled[id(params)] == 3:  # two tokens go out, then its third sampling raises
                running_when_failed.append(len(engine.engine.scheduler.running))
                raise RuntimeError("injected sampling failure")
        return original(self, slot, logits, params)

    monkeypatch.setattr(ModelRunner, "_sample", failing_for_the_poisoned_request)
    url = f"{base}/v1/chat/completions"
    long = {"model": model_dir.name, "messages": [{"role": "user", "content": "long"}], "temperature": 0,
            "max_tokens": 1000, "stream": True}
    poisoned = {"model": model_dir.name, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0,
                "seed": POISON, "max_tokens": 50, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client, client.stream("POST", url, json=long) as first:
            lines = first.aiter_lines()
            seen = []
            async for line in lines:  # the long stream is under way...
                seen.append(line)
                if '"content": "' in line and '"content": ""' not in line:
                    break
            bad = await client.post(url, json=poisoned)  # ...when the poisoned one joins the batch and fails
            seen += [line async for line in lines]
            return first.status_code, "\n".join(seen), bad

    status, long_text, bad = asyncio.run(scenario())
    assert running_when_failed and running_when_failed[0] >= 2, "the failure did not happen beside the other stream"
    assert bad.status_code == 200  # admitted; its failure came once streaming had started...
    bad_events = events(bad.text)
    error = json.loads(bad_events[-1])["error"]  # ...so it ends with an error event, and no [DONE]
    assert error["code"] == "engine_error" and "[DONE]" not in bad_events
    assert status == 200
    long_events = events(long_text)
    assert long_events[-1] == "[DONE]"
    assert json.loads(long_events[-2])["choices"][0]["finish_reason"] == "length"
    # Its text is what the same request gets alone, so the failure beside it changed nothing.
    alone = httpx.post(url, json={**long, "stream": False}, timeout=120).json()
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in long_events[:-1])
    assert text == alone["choices"][0]["message"]["content"]
    assert engine.running == 0


def test_non_streaming_requests_whose_clients_disconnect_are_aborted(inproc, model_dir, monkeypatch):
    """Each decoding step is slowed to 20 ms, so these 1,500-token requests would hold their slots for 30 s or
    more; the engine's running count shows them freed as soon as their clients have gone."""
    base, engine = inproc
    original = ModelRunner.step

    def slow_step(self, rows, chunk):
        time.sleep(0.02)
        return original(self, rows, chunk)

    monkeypatch.setattr(ModelRunner, "step", slow_step)
    body = {"model": model_dir.name, "prompt": "long", "temperature": 0, "max_tokens": 1500}

    async def abandon():
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(client.post(f"{base}/v1/completions", json=body)) for _ in range(3)]
            deadline = time.time() + 60
            while engine.running < 3 and time.time() < deadline:
                await asyncio.sleep(0.05)
            assert engine.running == 3, "the requests did not all start"
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(abandon())
    gone = time.time()
    wait_for(lambda: engine.running == 0 and engine.queue_depth == 0, 15, "the abandoned requests to be aborted")
    assert time.time() - gone < 15
    blocks = engine.engine.scheduler.blocks  # their KV-cache blocks are back (a prefix-LM model: no prefix cache)
    assert blocks.in_use == 0 and len(blocks.free) == blocks.usable
