"""What a client can send that must get a clear 4xx, never a 5xx or a cut stream: sampling values, bad bytes,
headers; and what the server shows: /metrics behind the key, CORS with a key, the Host check, its schema."""

import asyncio
import json
import random
import string
from urllib.parse import quote

import httpx
import openai
import pytest


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(model_dir, **extra) -> dict:
    return {"model": model_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ----- item 1: every sampling value is checked at the edge

@pytest.mark.parametrize("raw, param", [
    ('"temperature": 1e-30', "temperature"), ('"temperature": 1e-40', "temperature"),
    ('"temperature": NaN', "temperature"), ('"temperature": Infinity', "temperature"),
    ('"temperature": -0.5', "temperature"), ('"top_p": 1e-50', "top_p"), ('"top_p": NaN', "top_p"),
    ('"top_p": 0', "top_p"), ('"seed": 18446744073709551616', "seed"), ('"seed": -9223372036854775809', "seed"),
    ('"temperature": 0, "seed": 99999999999999999999999', "seed"), ('"presence_penalty": NaN', "presence_penalty"),
    ('"max_tokens": 1e400', "max_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_sampling_values_are_refused_with_a_400_naming_the_field(server, model_dir, api_key, raw, param, stream):
    body = json.dumps(chat(model_dir, stream=stream))[:-1] + f", {raw}}}"
    r = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=60,
                   headers={**auth(api_key), "Content-Type": "application/json"})
    assert assert_openai_error(r, 400)["param"] == param
    ok = httpx.post(f"{server}/v1/chat/completions", json=chat(model_dir), headers=auth(api_key), timeout=60)
    assert ok.status_code == 200  # nothing broke for the next request


@pytest.mark.parametrize("raw, param", [('"temperature": 1e-40', "temperature"), ('"top_p": 1e-50', "top_p"),
                                        ('"temperature": NaN', "temperature")])
def test_legacy_sampling_values_are_refused_too(server, api_key, raw, param):
    r = httpx.post(f"{server}/", content=f'{{"prompt": "hi", "max_length": 20, {raw}}}', timeout=60,
                   headers={**auth(api_key), "Content-Type": "application/json"})
    assert assert_openai_error(r, 400)["param"] == param


def test_seeds_at_the_ends_of_the_64_bit_range_are_served(server, model_dir, api_key):
    for seed in (2**63 - 1, -(2**63)):  # n = 3 from the largest seed wraps around instead of overflowing
        r = httpx.post(f"{server}/v1/chat/completions", json=chat(model_dir, seed=seed, n=3, temperature=1),
                       headers=auth(api_key), timeout=60)
        assert r.status_code == 200, r.text
    greedy = httpx.post(f"{server}/v1/chat/completions", json=chat(model_dir, seed=2**63 - 1, temperature=0),
                        headers=auth(api_key), timeout=60)
    assert greedy.status_code == 200, greedy.text


# ----- item 6: bad bytes and headers

def test_a_lone_surrogate_is_a_400(server, model_dir, api_key):
    body = json.dumps(chat(model_dir)).replace('"hi"', '"a\\ud800b"')
    for path in ("/v1/chat/completions", "/v1/completions"):
        payload = body if path.endswith("chat/completions") else json.dumps(
            {"model": model_dir.name, "prompt": "x", "max_tokens": 4}).replace('"x"', '"\\udfff"')
        r = httpx.post(f"{server}{path}", content=payload, timeout=60,
                       headers={**auth(api_key), "Content-Type": "application/json"})
        assert "surrogate" in assert_openai_error(r, 400)["message"]


@pytest.mark.parametrize("content, fragment", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    (b"[" * 1000 + b"]" * 1000, ""),
    (b'{"a":' * 1000 + b"1" + b"}" * 1000, ""),
    (b'{"model": "m", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", ""),
])
def test_invalid_utf8_and_deep_json_get_openai_errors(server, api_key, content, fragment):
    r = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=60,
                   headers={**auth(api_key), "Content-Type": "application/json"})
    assert fragment in assert_openai_error(r, 400)["message"]


def test_a_wrong_content_type_says_so(server, model_dir, api_key):
    r = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(chat(model_dir)), timeout=60,
                   headers={**auth(api_key), "Content-Type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in assert_openai_error(r, 415)["message"]


def test_unknown_paths_and_methods_get_openai_errors(server, api_key):
    assert_openai_error(httpx.get(f"{server}/v1/nothing-here", headers=auth(api_key)), 404)
    assert_openai_error(httpx.delete(f"{server}/v1/chat/completions", headers=auth(api_key)), 405)


@pytest.mark.parametrize("header", ["bearer {}", "BEARER {}", "Bearer  {}", "bEaReR {}"])
def test_the_bearer_scheme_matches_in_any_case(server, model_dir, api_key, header):
    r = httpx.post(f"{server}/v1/chat/completions", json=chat(model_dir),
                   headers={"Authorization": header.format(api_key)}, timeout=60)
    assert r.status_code == 200, r.text
    wrong = httpx.post(f"{server}/v1/chat/completions", json=chat(model_dir),
                       headers={"Authorization": header.format(api_key + "x")}, timeout=60)
    assert_openai_error(wrong, 401)


def test_content_part_lists_are_accepted(server, model_dir, api_key):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=api_key)
    plain = client.chat.completions.create(model=model_dir.name, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": "hello"}])
    parts = client.chat.completions.create(model=model_dir.name, temperature=0, max_tokens=8,
                                           messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    image = chat(model_dir, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    r = httpx.post(f"{server}/v1/chat/completions", json=image, headers=auth(api_key), timeout=60)
    assert "image_url" in assert_openai_error(r, 400)["message"]


def test_the_openapi_schema_documents_errors_and_the_event_stream(server, api_key):
    schema = httpx.get(f"{server}/openapi.json", headers=auth(api_key)).json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        answers = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "429"} <= set(answers) and "422" not in answers
        assert "text/event-stream" in answers["200"]["content"]
        assert answers["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


# ----- item 4: /metrics

def test_metrics_need_the_key_and_are_labelled_by_route(server, api_key):
    assert_openai_error(httpx.get(f"{server}/metrics"), 401)
    before = httpx.get(f"{server}/metrics", headers=auth(api_key)).text
    crafted = '/x",status="200"} 1\nglmkit_injected_total 7\n#'
    paths = [crafted, *("/" + "".join(random.choices(string.ascii_letters, k=12)) for _ in range(100))]
    for path in paths:
        assert httpx.get(f"{server}{quote(path)}", headers=auth(api_key)).status_code == 404
    text = httpx.get(f"{server}/metrics", headers=auth(api_key)).text
    assert "glmkit_injected" not in text and "/x" not in text
    assert len(text) < len(before) + 400  # a few new (route, status) series, not one per path
    assert 'glmkit_requests_total{endpoint="unmatched",status="404"}' in text
    for name, kind in [("glmkit_requests_total", "counter"), ("glmkit_queue_depth", "gauge"),
                       ("glmkit_running_requests", "gauge"), ("glmkit_generation_seconds", "histogram")]:
        assert f"# HELP {name} " in text and f"# TYPE {name} {kind}" in text


# ----- item 5: the Host check on a loopback bind

def test_only_local_host_names_are_served_on_loopback(server, api_key):
    port = httpx.URL(server).port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{server}/health", headers={"Host": host}).status_code == 200
    for host in (f"evil.test:{port}", "attacker.example", f"127.0.0.1.nip.io:{port}"):
        r = httpx.get(f"{server}/v1/models", headers={"Host": host, **auth(api_key)})
        assert "Host" in assert_openai_error(r, 400)["message"]


@pytest.fixture(scope="module")
def keyed_cors_server(model_dir, launch_server, api_key):
    proc, base = launch_server(model_dir, "--api-key", api_key, "--cors-origin", "http://app.test",
                               "--allowed-host", "app-server.test", "--allowed-host", "127.0.0.1", "--max-batch", "1", "--max-queue", "1",
                               "--metrics-public")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_a_cors_preflight_needs_no_key_and_a_401_carries_cors_headers(keyed_cors_server, model_dir, api_key):
    origin = {"Origin": "http://app.test", "Host": "app-server.test"}
    preflight = httpx.options(f"{keyed_cors_server}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://app.test"
    unauthorized = httpx.post(f"{keyed_cors_server}/v1/chat/completions", json=chat(model_dir), headers=origin)
    assert_openai_error(unauthorized, 401)
    assert unauthorized.headers["access-control-allow-origin"] == "http://app.test"
    ok = httpx.post(f"{keyed_cors_server}/v1/chat/completions", json=chat(model_dir), timeout=60,
                    headers={**origin, **auth(api_key)})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.test"
    # --allowed-host replaces the loopback default; --metrics-public opens /metrics only
    assert httpx.get(f"{keyed_cors_server}/health", headers={"Host": "localhost"}).status_code == 400
    assert httpx.get(f"{keyed_cors_server}/metrics", headers={"Host": "app-server.test"}).status_code == 200


# ----- item 2: a stream meets a full queue before it starts

def test_a_stream_that_meets_a_full_queue_is_a_429_with_retry_after(keyed_cors_server, model_dir, api_key):
    body = chat(model_dir, max_tokens=300, stream=True)
    headers = {"Host": "app-server.test", **auth(api_key)}

    async def three():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one():
                async with c.stream("POST", f"{keyed_cors_server}/v1/chat/completions", json=body,
                                    headers=headers) as r:
                    return r.status_code, dict(r.headers), (await r.aread()).decode()
            return await asyncio.gather(*(one() for _ in range(3)))

    results = sorted(asyncio.run(three()), key=lambda r: r[0])
    assert [status for status, _, _ in results] == [200, 200, 429]
    for _, _, text in results[:2]:
        assert text.rstrip().endswith("data: [DONE]")
    _, headers_429, text_429 = results[2]
    assert int(headers_429["retry-after"]) >= 1
    assert json.loads(text_429)["error"]["code"] == "rate_limit_exceeded"


# ----- item 12: the legacy API and the page's icon

def test_legacy_max_length_over_the_context_is_refused(server, api_key):
    r = httpx.post(f"{server}/", json={"prompt": "hi", "max_length": 100000}, headers=auth(api_key), timeout=60)
    error = assert_openai_error(r, 400)
    assert error["param"] == "max_length" and "2048" in error["message"]


def test_no_favicon_404(server):
    assert httpx.get(f"{server}/favicon.ico").status_code == 204
