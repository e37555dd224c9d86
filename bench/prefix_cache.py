"""Automatic prefix caching in the engine: time to the first token of requests that share a 500-token system prompt
and differ in a short question, with the prefix cache (the default) and without it (prefix_cache_mb=0). Random
weights, greedy; prints JSON.

Each round builds a fresh engine per mode and warms it with one request of the same shape (with the cache, that
request leaves the system prompt's blocks behind); then each question is one request, timed from add_request to
the step that returns its first token (the prefill and the first sample). Medians over every question of every
round; the two modes must give each question the same first token.

    python bench/prefix_cache.py --threads 1 --questions 6 --rounds 3 > bench/results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_reuse import BENCH_SHAPES  # noqa: E402  (tiny-gqa and mid-gqa, the shapes the chat-reuse bench times)

from glmkit.engine import Engine  # noqa: E402
from glmkit.engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB  # noqa: E402
from glmkit.generation.sampling import SamplingParams  # noqa: E402
from glmkit.perf.speed import SHAPES, machine, random_model  # noqa: E402

CHOICES = {**BENCH_SHAPES, "chatglm3-6b": SHAPES["chatglm3-6b"], "glm-4-9b": SHAPES["glm-4-9b"]}
GMASK, SOP = 5, 6  # stand-ins for the specials (any ids do: the weights are random)


def random_ids(seed: int, length: int, vocab: int) -> list[int]:
    return torch.randint(10, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_token(engine: Engine, prompt: list[int]) -> tuple[float, int, int]:
    """(seconds to the first token, the token, prompt tokens the prefix cache supplied)."""
    start = time.perf_counter()
    request = engine.add_request(prompt, SamplingParams(max_new_tokens=1))
    (out,) = [o for o in engine.step() if o.request_id == request.request_id]
    elapsed = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return elapsed, out.token_id, out.cached_tokens or 0


def run(shape: str, system: int, question: int, questions: int, rounds: int, dtype: torch.dtype, bits: int,
        device: str) -> dict:
    config = CHOICES[shape]()
    model = random_model(config, dtype, bits=bits).to(device)
    vocab = config.vocab_size
    head = [GMASK, SOP, *random_ids(0, system, vocab)]
    prompts = [[*head, *random_ids(100 + q, question, vocab)] for q in range(questions + 1)]  # prompts[0]: warm-up
    modes = {"cache": DEFAULT_PREFIX_CACHE_MB, "no_cache": 0}
    timings: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens: dict[str, list[int]] = {mode: [] for mode in modes}
    cached: dict[str, set[int]] = {mode: set() for mode in modes}
    for _ in range(rounds):
        for mode, megabytes in modes.items():
            engine = Engine(model, max_batch=1, max_length=len(prompts[0]) + 1, prefix_cache_mb=megabytes)
            first_token(engine, prompts[0])
            for prompt in prompts[1:]:
                elapsed, token, hit = first_token(engine, prompt)
                timings[mode].append(elapsed)
                tokens[mode].append(token)
                cached[mode].add(hit)
    model.clear_kv_cache()
    if tokens["cache"] != tokens["no_cache"]:
        raise AssertionError(f"first tokens differ with and without the prefix cache: {tokens}")
    median = {mode: statistics.median(values) for mode, values in timings.items()}
    return {
        "shape": shape, "dtype": str(dtype).removeprefix("torch."), "bits": bits, "device": device,
        "layers": config.num_layers, "hidden": config.hidden_size, "heads": config.num_attention_heads,
        "kv_heads": config.kv_heads, "vocab": vocab,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "prompt_tokens": len(prompts[1]), "system_tokens": len(head), "question_tokens": question,
        "cached_tokens": {mode: sorted(values) for mode, values in cached.items()},
        "ttft_ms": {mode: round(value * 1000, 2) for mode, value in median.items()},
        "ttft_runs_ms": {mode: [round(t * 1000, 2) for t in values] for mode, values in timings.items()},
        "speedup": round(median["no_cache"] / median["cache"], 2), "same_first_tokens": True,
        "questions": questions, "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(CHOICES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--system", type=int, default=498, help="random system-prompt ids after [gMASK] sop")
    parser.add_argument("--question", type=int, default=24, help="ids per question")
    parser.add_argument("--questions", type=int, default=6, help="timed questions per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--bits", type=int, default=0, choices=[0, 4, 8], help="quantized block linears")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: a busy one makes every number slower and noisier
    dtype = getattr(torch, args.dtype)
    results = [run(shape, args.system, args.question, args.questions, args.rounds, dtype, args.bits, args.device)
               for shape in args.shapes]
    load = {"load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    print(json.dumps({"machine": {**machine(), "threads": args.threads, **load}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
