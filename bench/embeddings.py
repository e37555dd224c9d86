"""Embedding throughput: N inputs of mixed lengths embedded one forward pass each, in padded batches
(glmkit.generation.embed, the server's path), and one by one through the full forward pass with the logits (what
pooling `model(ids).hidden_states` would cost). fp32; medians of the repeats; prints JSON.

The shipped demo model (ChatGLM-6B layout, mean pooling) and a random mid-size GLM-4-shaped model (causal,
last-token pooling, 32K vocabulary). Every way must give the same vectors (max difference reported).

    python bench/embeddings.py --threads 2 > bench/results/embeddings.json
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit  # noqa: E402
from glmkit.generation.embed import EMBED_BATCH_TOKENS, embed, embedding_layout, plan_batches  # noqa: E402
from glmkit.perf.speed import machine, random_model, thudm_shape  # noqa: E402


def models() -> dict:
    # mid: 8 layers, hidden 1024, 16 heads of 64 / 2 KV heads, SwiGLU 2816, 32K vocabulary (~120M parameters)
    mid = thudm_shape(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, kv_channels=64,
                      padded_vocab_size=32000, seq_length=4096)
    return {"demo": lambda: glmkit.load(progress=False)[0], "mid-gqa": lambda: random_model(mid, torch.float32)}


def inputs(count: int, shortest: int, longest: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(shortest, longest + 1, (count,), generator=g).tolist()
    return [torch.randint(10, min(vocab, 6000), (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def with_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    """One by one through GLMForCausalLM.forward (logits over the vocabulary included), pooled the same way."""
    rows = []
    for ids in sequences:
        positions, blocked = embedding_layout(model, ids)
        hidden = model(torch.tensor([ids]), positions[None], blocked[None, None]).hidden_states[0]
        rows.append(F.normalize(hidden[-1] if model.config.causal else hidden.mean(0), dim=-1))
    return torch.stack(rows)


def timed(ways: dict, repeats: int) -> dict[str, tuple[float, list[float], torch.Tensor]]:
    """Each way once per round, the rounds repeated, so that a shared machine's load falls on all of them alike."""
    runs: dict[str, list[float]] = {way: [] for way in ways}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for way, fn in ways.items():
            start = time.perf_counter()
            outs[way] = fn()
            runs[way].append(time.perf_counter() - start)
    return {way: (statistics.median(runs[way]), runs[way], outs[way]) for way in ways}


def run(name: str, count: int, shortest: int, longest: int, repeats: int) -> dict:
    model = models()[name]().eval()
    sequences = inputs(count, shortest, longest, model.config.vocab_size)
    tokens = sum(len(s) for s in sequences)
    ways = {
        "batched": lambda: embed(model, sequences),
        "one_by_one": lambda: torch.cat([embed(model, [s]) for s in sequences]),
        "one_by_one_with_logits": lambda: with_logits(model, sequences),
    }
    results = timed(ways, repeats)
    padded = sum(len(rows) * len(sequences[rows[0]]) for rows in plan_batches([len(s) for s in sequences]))
    reference = results["batched"][2]
    gap = max(float((out - reference).abs().max()) for _, _, out in results.values())
    if gap > 1e-4:
        raise AssertionError(f"{name}: the ways disagree by {gap}")
    return {
        "model": name, "pooling": "last" if model.config.causal else "mean", "layers": model.config.num_layers,
        "hidden": model.config.hidden_size, "vocab": model.config.vocab_size,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "inputs": count, "tokens": tokens, "lengths": [shortest, longest], "batch_tokens": EMBED_BATCH_TOKENS,
        "batched_padded_tokens": padded,
        "seconds": {way: round(r[0], 3) for way, r in results.items()},
        "tokens_per_s": {way: round(tokens / r[0]) for way, r in results.items()},
        "runs_s": {way: [round(t, 3) for t in r[1]] for way, r in results.items()},
        "batched_speedup": {way: round(r[0] / results["batched"][0], 2) for way, r in results.items()},
        "max_abs_difference": gap, "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo", "mid-gqa"], choices=["demo", "mid-gqa"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--shortest", type=int, default=8)
    parser.add_argument("--longest", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # the machine may be shared: a busy one makes every number slower and noisier
    results = [run(name, args.inputs, args.shortest, args.longest, args.repeats) for name in args.models]
    load = {"load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    print(json.dumps({"machine": {**machine(), "threads": args.threads, **load}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
