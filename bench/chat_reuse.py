"""KV-cache reuse across chat turns: time to the first token of a conversation's turn 5, with the last turn's cache
continued (`reuse_cache=True`, what chat and `glmkit chat` do on the causal families) and with the whole prompt
prefilled. Random fp32 weights, greedy; prints JSON.

A turn is simulated at the token level, as GLM-4's format writes it when the reply re-encodes to the ids the model
generated: turn k's prompt = turn k-1's prompt + its reply ids + `<|user|>` + the new message + `<|assistant|>`,
after a system prompt. So turn 5 with reuse computes only the reply's last id (sampled, never fed) and the new
message; without reuse, all of it. Each timed run starts from a copy of the cache turn 4 left, and both ways must
give the same first token.

    python bench/chat_reuse.py --threads 2 > bench/results/chat_reuse.json
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

from glmkit.generation.generate import stream_tokens  # noqa: E402
from glmkit.generation.sampling import SamplingParams  # noqa: E402
from glmkit.models.glm import RetainedKV  # noqa: E402
from glmkit.perf.speed import SHAPES, machine, random_model, thudm_shape  # noqa: E402

BENCH_SHAPES = {
    "tiny-gqa": SHAPES["tiny-gqa"],  # 2 layers, hidden 256, 4 heads / 2 KV heads
    # mid: 8 layers, hidden 1024, 16 heads of 64 / 2 KV heads, SwiGLU 2816, 32K vocabulary (~120M parameters)
    "mid-gqa": lambda: thudm_shape(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                                   kv_channels=64, padded_vocab_size=32000, seq_length=4096),
}
GMASK, SOP, USER, ASSISTANT = 5, 6, 7, 8  # stand-ins for the specials (any ids do: the weights are random)


def message(turn: int, length: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + turn)
    return torch.randint(10, vocab, (length,), generator=g).tolist()


def first_token(model, prompt: list[int], params: SamplingParams, reuse: bool) -> tuple[float, int]:
    start = time.perf_counter()
    stream = stream_tokens(model, [prompt], params, reuse_cache=reuse)
    token = int(next(stream)[0])
    elapsed = time.perf_counter() - start
    stream.close()
    return elapsed, token


def copy_of(kept: RetainedKV) -> RetainedKV:
    return RetainedKV(kept.ids, [cache.grown(cache.k.shape[2], len(kept.ids)) for cache in kept.caches])


def run(shape: str, system: int, user: int, reply: int, repeats: int) -> dict:
    config = BENCH_SHAPES[shape]()
    model = random_model(config, torch.float32).eval()
    vocab = config.vocab_size
    no_stop = (vocab + 1,)  # replies of exactly `reply` ids
    params = SamplingParams(max_new_tokens=reply, eos_token_ids=no_stop)
    prompt = [GMASK, SOP, *message(0, system, vocab)]
    model.clear_kv_cache()
    for turn in range(1, 5):  # turns 1..4 with reuse, as a chat would run them
        prompt = [*prompt, USER, *message(turn, user, vocab), ASSISTANT]
        answer = [int(t[0]) for t in stream_tokens(model, [prompt], params, reuse_cache=True)]
        prompt = [*prompt, *answer]
    prompt = [*prompt, USER, *message(5, user, vocab), ASSISTANT]  # turn 5
    after_turn_4 = copy_of(model.__dict__["_retained_kv"])
    timings: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, set[int]] = {True: set(), False: set()}
    computed: dict[bool, int] = {}
    for _ in range(repeats):
        for reuse in (False, True):
            model.clear_kv_cache()
            if reuse:
                model._retained_kv = copy_of(after_turn_4)
            elapsed, token = first_token(model, prompt, params, reuse)
            timings[reuse].append(elapsed)
            tokens[reuse].add(token)
            computed[reuse] = model.last_prefill.computed
    model.clear_kv_cache()
    if tokens[True] != tokens[False] or len(tokens[True]) != 1:
        raise AssertionError(f"first tokens differ with and without reuse: {tokens}")
    with_reuse, without = statistics.median(timings[True]), statistics.median(timings[False])
    return {
        "shape": shape, "layers": config.num_layers, "hidden": config.hidden_size,
        "heads": config.num_attention_heads, "kv_heads": config.kv_heads, "vocab": vocab,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "turn5_prompt_tokens": len(prompt), "system_tokens": system, "user_tokens": user, "reply_tokens": reply,
        "prefilled_tokens": {"reuse": computed[True], "full": computed[False]},
        "ttft_turn5_ms": {"reuse": round(with_reuse * 1000, 2), "full": round(without * 1000, 2)},
        "ttft_runs_ms": {"reuse": [round(t * 1000, 2) for t in timings[True]],
                         "full": [round(t * 1000, 2) for t in timings[False]]},
        "speedup": round(without / with_reuse, 2), "same_first_token": True, "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(BENCH_SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system", type=int, default=256, help="system prompt ids")
    parser.add_argument("--user", type=int, default=48, help="ids per user message")
    parser.add_argument("--reply", type=int, default=32, help="ids per reply")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: a busy one makes every number slower and noisier
    results = [run(shape, args.system, args.user, args.reply, args.repeats) for shape in args.shapes]
    load = {"load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    print(json.dumps({"machine": {**machine(), "threads": args.threads, **load}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
