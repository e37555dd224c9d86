"""Soak the server: N concurrent streaming clients for M minutes, then print one JSON object.

    python bench/soak.py --clients 8 --minutes 2 [--model DIR] [--out bench/results/soak_demo.json]

It starts `glmkit serve` on loopback (the demo model by default), asks each prompt once alone for its greedy
reply, then runs the clients: each sends greedy streaming chat requests back to back. It counts errors
(a non-200 status, an error event, a stream without [DONE]), lost replies (empty) and mixed ones (different
from the prompt's solo reply, which under greedy decoding means another request's tokens leaked in), the
latency of whole requests (p50/p95), and samples the server's RSS every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["What is the capital of France?", "法国的首都是哪里？", "What is 12 + 34?", "23加45等于多少？",
           "How do you say 'water' in Chinese?", "“朋友”用英语怎么说？", "Who are you?", "你是谁？"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(outcome, text): outcome "ok", or what went wrong."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True}
    text, done = [], False
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"status {r.status_code}", ""
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return "error event", ""
            text.append(chunk["choices"][0]["delta"].get("content") or "")
    return ("ok" if done else "no [DONE]"), "".join(text)


async def soak(base: str, model: str, pid: int, clients: int, seconds: float, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        solo = {}
        for p in PROMPTS:
            outcome, text = await one(client, base, model, p, max_tokens)
            assert outcome == "ok", outcome
            solo[p] = text
        latencies: list[float] = []
        counts = {"requests": 0, "errors": 0, "lost": 0, "mixed": 0}
        outcomes: dict[str, int] = {}
        rss: list[tuple[float, float]] = []
        start = time.perf_counter()
        stop_at = start + seconds

        async def client_loop(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                began = time.perf_counter()
                try:
                    outcome, text = await one(client, base, model, prompt, max_tokens)
                except httpx.HTTPError as e:
                    outcome, text = f"{type(e).__name__}", ""
                latencies.append(time.perf_counter() - began)
                counts["requests"] += 1
                if outcome != "ok":
                    counts["errors"] += 1
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                elif not text and solo[prompt]:
                    counts["lost"] += 1
                elif text != solo[prompt]:
                    counts["mixed"] += 1

        async def sample_rss() -> None:
            while time.perf_counter() < stop_at:
                rss.append((round(time.perf_counter() - start, 1), round(rss_mib(pid), 1)))
                await asyncio.sleep(min(10.0, max(1.0, seconds / 20)))

        await asyncio.gather(sample_rss(), *(client_loop(k) for k in range(clients)))
        rss.append((round(time.perf_counter() - start, 1), round(rss_mib(pid), 1)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients, "seconds": round(elapsed, 1), "max_tokens": max_tokens, **counts,
        "error_kinds": outcomes, "requests_per_s": round(counts["requests"] / elapsed, 2),
        "latency_s": {"p50": round(statistics.median(ordered), 3),
                      "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
                      "max": round(ordered[-1], 3)},
        "rss_mib": {"first": rss[0][1], "last": rss[-1][1], "max": max(v for _, v in rss), "samples": rss},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to soak (default: 2)")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens per request (default: 48)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default: 8)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    from glmkit.serve.app import model_name_for

    port = free_port()
    command = [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
               "--max-queue", str(max(64, args.clients))]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit("the server did not start in 300 s") from None
                time.sleep(0.5)
        result = asyncio.run(soak(base, model_name_for(Path(args.model) if args.model else None), server.pid,
                                  args.clients, args.minutes * 60, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {"model": model_name_for(Path(args.model) if args.model else None), **result}
    text = json.dumps(result, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
