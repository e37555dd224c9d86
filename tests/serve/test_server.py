"""A real `glmkit serve` process on loopback, driven by the official openai client and raw HTTP."""

import asyncio
import json
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server, api_key):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key)


def name_of(model_dir):
    return model_dir.name


def test_chat_completion_equals_local_greedy_chat(client, model_dir, local):
    model, tokenizer = local
    reply = client.chat.completions.create(model=name_of(model_dir), temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": "你好"}])
    expected, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=16)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 16 and reply.usage.prompt_tokens == len(tokenizer.encode("你好"))


def test_streaming_chat_gives_the_same_text(client, model_dir):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "and?"}]
    whole = client.chat.completions.create(model=name_of(model_dir), temperature=0, max_tokens=12, messages=messages)
    chunks = list(client.chat.completions.create(model=name_of(model_dir), temperature=0, max_tokens=12,
                                                 messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_and_stop_string(client, model_dir, local):
    model, tokenizer = local
    full = client.completions.create(model=name_of(model_dir), prompt="hello", temperature=0, max_tokens=20)
    text = full.choices[0].text
    stop = text[8:10]
    cut = client.completions.create(model=name_of(model_dir), prompt="hello", temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_legacy_chatglm_api(server, local, api_key):
    model, tokenizer = local
    body = {"prompt": "你好", "history": [], "max_length": 30, "top_p": 0.7, "temperature": 0}
    r = httpx.post(f"{server}/", json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=60).json()
    expected, _ = model.chat(tokenizer, "你好", do_sample=False, max_length=30)
    assert r["response"] == expected and r["history"] == [["你好", expected]] and r["status"] == 200
    assert set(r) == {"response", "history", "status", "time"}


def test_models_health_metrics(client, server, model_dir):
    assert [m.id for m in client.models.list()] == [name_of(model_dir)]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {client.api_key}"}).text
    assert "glmkit_completion_tokens_total" in metrics and 'endpoint="/v1/chat/completions",status="200"' in metrics


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "M", "messages": "hello"}, 400, "messages"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "M", "messages": []}, 400, "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi " * 3000}]}, 400, "context"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "M", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
])
def test_bad_requests_get_clear_4xx(server, model_dir, body, status, fragment, api_key):
    if isinstance(body, dict) and body.get("model") == "M":
        body["model"] = name_of(model_dir)
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] or fragment == error["param"], error
    assert httpx.get(f"{server}/health").status_code == 200  # still up


def test_n_choices_are_the_seeded_samples_of_single_requests(client, model_dir):
    """Choice i of a seeded n-choice request is what a single request with seed + i samples, streamed
    or not; usage counts the prompt once and every choice's tokens."""
    ask = dict(model=name_of(model_dir), temperature=1.0, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    singles = [client.chat.completions.create(**ask, seed=7 + i) for i in range(3)]
    texts = [r.choices[0].message.content for r in singles]
    assert len(set(texts)) > 1  # other seeds sample other answers, so the comparisons below can fail
    many = client.chat.completions.create(**ask, seed=7, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == texts
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(r.usage.completion_tokens for r in singles)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**ask, seed=7, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


@pytest.mark.parametrize("extra, param", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
])
def test_options_the_server_cannot_honour_are_refused_not_ignored(server, model_dir, api_key, extra, param):
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": name_of(model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", json={**body, **extra}, timeout=60, headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if param != "n":  # the same option at its no-op value is accepted (clients send those)
        neutral = {"top_logprobs": None, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
        ok = httpx.post(f"{server}/v1/chat/completions", json={**body, param: neutral[param]}, timeout=60,
                        headers=headers)
        assert ok.status_code == 200, ok.text


def test_wrong_api_key_is_401(server, model_dir):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=name_of(model_dir), messages=[{"role": "user", "content": "hi"}])


def test_sixteen_concurrent_streams_each_equal_their_solo_reply(server, model_dir, local, api_key):
    model, tokenizer = local
    prompts = [f"question {i} " * (1 + i % 5) for i in range(16)]
    aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=api_key)

    async def one(p):
        stream = await aclient.chat.completions.create(model=name_of(model_dir), temperature=0, max_tokens=20,
                                                       messages=[{"role": "user", "content": p}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in prompts))

    replies = asyncio.run(all_of_them())
    for p, reply in zip(prompts, replies, strict=True):
        assert reply == model.chat(tokenizer, p, do_sample=False, max_new_tokens=20)[0]


def test_a_client_that_disconnects_frees_its_slot(server, model_dir, api_key):
    body = {"model": name_of(model_dir), "messages": [{"role": "user", "content": "long"}], "max_tokens": 1500,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api_key}"}) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):
            pass
    deadline = time.time() + 20
    while time.time() < deadline:
        if "glmkit_running_requests 0" in httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {api_key}"}).text:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected request still holds its slot")


@pytest.fixture(scope="module")
def small_server(model_dir, launch_server):
    """A server with room for one running and one waiting request, and one allowed browser origin."""
    proc, base = launch_server(model_dir, "--max-batch", "1", "--max-queue", "1", "--cors-origin", "http://app.test")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_a_full_queue_answers_429_and_the_server_recovers(small_server, model_dir):
    body = {"model": name_of(model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}

    async def three():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(f"{small_server}/v1/chat/completions", json=body) for _ in range(3)))

    codes = sorted(r.status_code for r in asyncio.run(three()))
    assert codes == [200, 200, 429]
    again = httpx.post(f"{small_server}/v1/chat/completions", json=body, timeout=120)
    assert again.status_code == 200


def test_cors_allows_only_the_configured_origin(small_server):
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(f"{small_server}/v1/chat/completions", headers={"Origin": "http://app.test", **preflight})
    assert ok.headers.get("access-control-allow-origin") == "http://app.test"
    other = httpx.options(f"{small_server}/v1/chat/completions", headers={"Origin": "http://evil.test", **preflight})
    assert other.headers.get("access-control-allow-origin") is None
