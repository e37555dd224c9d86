"""Aggregate generation throughput of `glmkit serve` for 1, 4, 8 and 16 concurrent streaming clients.

Starts a real server on loopback (the shipped demo model unless --model), sends N concurrent streaming
chat requests (long-answer questions, greedy, up to max_tokens tokens each), and reports generated tokens per second over the wall time,
median of --repeats runs. Prints JSON.

    python bench/serve_throughput.py [--model PATH] [--streams 1 4 8 16] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


# Questions the demo model answers at length (30-40 tokens): a short answer would time HTTP set-up
# more than generation.
PROMPTS = ["What can you do?", "你能做什么？"]


async def one_stream(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        async for _ in r.aiter_lines():
            pass
    return max_tokens


async def run(base: str, model: str, streams: int, max_tokens: int) -> float:
    """Generated tokens per second with `streams` concurrent clients (completion tokens from /metrics)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    before = completion_tokens(base)
    start = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(one_stream(client, base, model, p, max_tokens) for p in prompts))
    elapsed = time.perf_counter() - start
    return (completion_tokens(base) - before) / elapsed


def completion_tokens(base: str) -> int:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("glmkit_completion_tokens_total "):
            return int(float(line.split()[1]))
    raise RuntimeError("no completion token counter in /metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (glmkit serve --threads)")
    args = parser.parse_args()
    proc, base = start_server(args.model, max(args.streams), args.threads)
    try:
        name = httpx.get(f"{base}/health").json()["model"]
        asyncio.run(run(base, name, 2, 8))  # warm-up
        results = {}
        for n in args.streams:
            rates = [asyncio.run(run(base, name, n, args.max_tokens)) for _ in range(args.repeats)]
            results[str(n)] = {"tokens_per_s_median": round(statistics.median(rates), 1),
                               "runs": [round(r, 1) for r in rates]}
        one = results[str(args.streams[0])]["tokens_per_s_median"]
        for row in results.values():
            row["speedup_vs_first"] = round(row["tokens_per_s_median"] / one, 2)
    finally:
        proc.terminate()
        proc.wait()
    print(json.dumps({
        "benchmark": "serve_throughput", "model": name, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "server_threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "streams": results,
    }, indent=2))


if __name__ == "__main__":
    main()
