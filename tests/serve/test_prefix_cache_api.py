"""Prefix caching through real `glmkit serve` processes and the official openai client: a causal (ChatGLM3) model in
fp32 served with the cache and with room for two blocks only, against the same app without a cache (in this
process); every greedy answer must be the same on all three, and the usage says how much of each prompt the cache
held."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

import glmkit
from glmkit.cli import main as cli_main
from glmkit.serve.app import create_app

from servers import start_servers

SYSTEM = ("You are a careful assistant for a small shop that sells tea, maps and bicycles. Answer in one short "
          "sentence, name the product, and never promise a delivery date. ") * 3
MODEL = "tiny-chatglm3"
HTTP: dict[str, httpx.Client] = {}  # the servers' plain HTTP clients (for /metrics), by name
QUESTIONS = ["Which tea do you have?", "Do you sell maps of the coast?", "How much is a bicycle bell?",
             "Can I pay with a card?"]


@pytest.fixture(scope="module")
def servers(chatglm3_model):
    """name -> OpenAI client: servers with the default cache and with 0.02 MiB (2 blocks of this model's 8 KiB), and
    the app without a cache, here."""
    flags = {"cached": [], "tiny": ["--prefix-cache-mb", "0.02"]}
    common = ["--dtype", "float32", "--max-batch", "4", "--served-model-name", MODEL]
    started = dict(zip(flags, start_servers(chatglm3_model, *([*common, *extra] for extra in flags.values())),
                       strict=True))
    http = {name: httpx.Client(base_url=base, timeout=60) for name, (_, base) in started.items()}
    model, tokenizer = glmkit.load(chatglm3_model, dtype="float32", progress=False)
    http["plain"] = TestClient(create_app(model, tokenizer, MODEL, max_batch=4, prefix_cache_mb=0))
    HTTP.update(http)
    yield {name: OpenAI(base_url=f"{client.base_url}/v1", api_key="none", max_retries=0, http_client=client)
           for name, client in http.items()}
    for proc, _ in started.values():
        proc.terminate()
        proc.wait(timeout=30)


def chat(client: OpenAI, messages: list[dict], max_tokens: int = 12):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=max_tokens)


def ask(client: OpenAI, system: str, question: str):
    return chat(client, [{"role": "system", "content": system}, {"role": "user", "content": question}])


def cached_tokens(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def test_chats_sharing_a_system_prompt_answer_as_without_the_cache(servers):
    system = "Shop A. " + SYSTEM
    plain = [ask(servers["plain"], system, q) for q in QUESTIONS[:3]]
    cached = [ask(servers["cached"], system, q) for q in QUESTIONS[:3]]
    assert [r.choices[0].message.content for r in cached] == [r.choices[0].message.content for r in plain]
    assert all(cached_tokens(r) == 0 for r in plain)
    assert cached_tokens(cached[0]) == 0  # nothing was cached before
    for reply in cached[1:]:  # the system prompt's blocks (at least 3: it is far longer than 48 tokens)
        assert 48 <= cached_tokens(reply) < reply.usage.prompt_tokens and cached_tokens(reply) % 16 == 0


def test_a_continued_conversation_finds_its_first_turn(servers):
    system = "Shop B. " + SYSTEM
    first = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]
    turn1 = {name: chat(servers[name], first) for name in ("plain", "cached")}
    assert turn1["cached"].choices[0].message.content == turn1["plain"].choices[0].message.content
    second = [*first, {"role": "assistant", "content": turn1["plain"].choices[0].message.content},
              {"role": "user", "content": QUESTIONS[1]}]
    turn2 = {name: chat(servers[name], second) for name in ("plain", "cached")}
    assert turn2["cached"].choices[0].message.content == turn2["plain"].choices[0].message.content
    # The first turn's prompt starts the second's: all its full blocks come from the cache.
    assert cached_tokens(turn2["cached"]) >= turn1["cached"].usage.prompt_tokens // 16 * 16


def test_requests_in_the_same_batch_answer_as_alone(servers):
    system = "Shop C. " + SYSTEM
    plain = [ask(servers["plain"], system, q).choices[0].message.content for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(servers["cached"], system, q), QUESTIONS))
    assert [r.choices[0].message.content for r in together] == plain
    assert max(cached_tokens(r) for r in together) >= 48  # later prefills found the earlier ones' blocks


def test_eviction_under_a_two_block_budget_keeps_answers_exact(servers):
    d, e = "Shop D. " + SYSTEM, "Shop E. " + SYSTEM  # their first blocks differ already
    prompts = [(d, QUESTIONS[0]), (d, QUESTIONS[1]), (e, QUESTIONS[0]), (d, QUESTIONS[2])]
    plain = [ask(servers["plain"], s, q).choices[0].message.content for s, q in prompts]
    tiny = [ask(servers["tiny"], s, q) for s, q in prompts]
    assert [r.choices[0].message.content for r in tiny] == plain
    # Room for D's first two blocks, which the second D finds; E's take their place, so the last D finds none.
    assert [cached_tokens(r) for r in tiny] == [0, 32, 0, 0]


def test_echo_with_prompt_logprobs_is_computed_whole(servers):
    prompt = "Shop F. " + SYSTEM + QUESTIONS[2]

    def echo(name: str):
        return servers[name].completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2,
                                                max_tokens=4, temperature=0)

    want = echo("plain")
    for got in (echo("cached"), echo("cached")):  # the second finds the first's blocks and must not use them
        assert got.choices[0].text == want.choices[0].text
        assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
        pairs = zip(got.choices[0].logprobs.token_logprobs, want.choices[0].logprobs.token_logprobs, strict=True)
        assert all((a is None and b is None) or abs(a - b) < 1e-4 for a, b in pairs)
        assert cached_tokens(got) == 0


def metric(server: str, name: str) -> float:
    text = HTTP[server].get("/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_metrics_count_the_tokens_looked_up_and_found(servers):
    ask(servers["cached"], "Shop G. " + SYSTEM, QUESTIONS[0])
    ask(servers["cached"], "Shop G. " + SYSTEM, QUESTIONS[1])
    queried = metric("cached", "glmkit_prefix_cache_queried_tokens_total")
    hits = metric("cached", "glmkit_prefix_cache_hit_tokens_total")
    assert 48 <= hits < queried
    assert metric("plain", "glmkit_prefix_cache_queried_tokens_total") == 0


@pytest.mark.parametrize("value", ["-1", "nan", "lots"])
def test_a_bad_budget_is_refused_in_one_line(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--model", "unused", "--prefix-cache-mb", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--prefix-cache-mb" in err and "give a number >= 0" in err
