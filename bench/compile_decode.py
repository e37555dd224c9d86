"""Does torch.compile speed up decoding? Times cached decode steps eagerly and with every block
compiled (`torch.compile(block.forward, dynamic=True)`), on a random INT4 model. Prints JSON.

The native kernels are ctypes calls, which dynamo cannot trace: the graph breaks at every quantized
linear, so what compiles is the short stretch of norms, rotary and attention between them.

    python bench/compile_decode.py --shape tiny --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmkit.generation.generate import decode_one_token, prefill  # noqa: E402
from glmkit.perf.speed import SHAPES, machine, random_model, random_prompt  # noqa: E402


def time_decode(model, config, steps: int) -> dict:
    logits, state = prefill(model, [random_prompt(config, 32)], 32 + steps + 1)
    start = time.perf_counter()
    logits = decode_one_token(model, logits.argmax(-1), state)  # compiles here, when compiled
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = decode_one_token(model, logits.argmax(-1), state)
        times.append(time.perf_counter() - start)
    model.clear_kv_cache()
    return {"first_step_s": round(first, 2), "decode_ms_per_token": round(statistics.median(times) * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SHAPES[args.shape]()
    model = random_model(config, torch.float32, 4)
    report = {"machine": machine(), "shape": args.shape, "bits": 4, "eager": time_decode(model, config, args.steps)}
    for block in model.transformer.layers:
        block.forward = torch.compile(block.forward, dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's graph-break warnings, one per kernel call site
        report["compiled_blocks"] = time_decode(model, config, args.steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
