"""One quantized linear of a ChatGLM-6B shape, each matmul path timed alone: glmkit's native kernels
(int8 activations) in each kernel set this CPU runs, the bf16 prompt path (dequantize + PyTorch's bf16
matmul), PyTorch's weight-only ops (float activations, what glmkit falls back to), and a dense fp32
matmul for scale. Medians over repeats, JSON on stdout.

Decoding reads each weight once per token from memory, not from cache, so for few rows the calls
cycle through copies of the layer that together exceed the CPU's caches (`--working-set-gib`).

    python bench/kernels.py --threads 2 --rows 1 512 --out bench/results/kernels_chatglm-6b.json
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

from glmkit.perf.speed import machine, read_bandwidth_gb_per_s  # noqa: E402
from glmkit.quant import kernels  # noqa: E402
from glmkit.quant.quantize import QuantizedLinear  # noqa: E402

SHAPES = {"qkv 12288x4096": (12288, 4096), "h_to_4h 16384x4096": (16384, 4096), "4h_to_h 4096x16384": (4096, 16384)}


def layer(out_features: int, in_features: int, bits: int) -> QuantizedLinear:
    q = QuantizedLinear(in_features, out_features, bits, 128 if bits == 4 else 0, bias=False, dtype=torch.bfloat16)
    q.weight.random_(-127, 128)
    q.weight_scale.fill_(1e-3)
    return q


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: the PyTorch int4 path packs its weights on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def cycling(layers: list, x: torch.Tensor):
    """A call that uses the next copy of the layer each time."""
    turn = iter(range(10**9))
    return lambda: layers[next(turn) % len(layers)](x)


def measure(name: str, bits: int, rows: int, repeats: int, working_set_gib: float) -> dict:
    out_features, in_features = SHAPES[name]
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    result = {"layer": name, "bits": bits, "rows": rows}
    first = layer(out_features, in_features, bits)
    stored_bytes = first.weight.numel()
    copies = max(1, int(working_set_gib * 2**30 / stored_bytes)) if rows <= 16 else 1
    native = [first] + [layer(out_features, in_features, bits) for _ in range(copies - 1)]
    dense_prompts, dense_min_rows = kernels.dense_prompts, kernels.DENSE_MIN_ROWS
    kernels.DENSE_MIN_ROWS = 10**9  # the integer kernels alone
    try:
        for isa in kernels.cpu_isas():
            os.environ["GLMKIT_KERNEL_ISA"] = isa
            result[f"native_{isa}_ms"] = median_ms(cycling(native, x), repeats)
            result[f"native_{isa}_weight_gb_per_s"] = round(stored_bytes / result[f"native_{isa}_ms"] / 1e6, 1)
        os.environ.pop("GLMKIT_KERNEL_ISA")
        kernels.DENSE_MIN_ROWS, kernels.dense_prompts = 0, lambda: True
        result["bf16_dequantize_matmul_ms"] = median_ms(cycling(native, x), repeats)
    finally:
        kernels.dense_prompts, kernels.DENSE_MIN_ROWS = dense_prompts, dense_min_rows
    result["glmkit_path"] = ("bf16 prompt" if kernels.prompt_through_bf16(rows)
                             else f"native {kernels.cpu_isas()[-1]}")
    del native
    available = kernels.available
    kernels.available = lambda: False  # the same layer class on PyTorch's ops
    try:
        fallback = [layer(out_features, in_features, bits) for _ in range(copies)]
        for copy in fallback:  # the PyTorch int4 path packs its weights on first use
            copy(x)
        result["pytorch_bf16_ms"] = median_ms(cycling(fallback, x), repeats)
    finally:
        kernels.available = available
    del fallback
    dense = [torch.randn(out_features, in_features) for _ in range(max(1, copies // (8 // bits)))]
    result["dense_fp32_ms"] = median_ms(cycling([lambda x, w=w: x.float() @ w.T for w in dense], x), repeats)
    best = min(result[f"native_{isa}_ms"] for isa in kernels.cpu_isas())
    result["native_speedup_over_pytorch"] = round(result["pytorch_bf16_ms"] / best, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512], help="activation rows (tokens)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=20, help="for 1 row; 512 rows use a fifth of it")
    parser.add_argument("--working-set-gib", type=float, default=1.0,
                        help="copies of the layer cycled through for <= 16 rows, so weights come from memory")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit("glmkit's native kernels are not available here (gcc, AVX2/FMA)")
    results = [measure(name, bits, rows, max(3, args.repeats // (5 if rows > 16 else 1)), args.working_set_gib)
               for rows in args.rows for bits in args.bits for name in SHAPES]
    text = json.dumps({"machine": machine(), "threads": args.threads,
                       "read_bandwidth_gb_per_s": read_bandwidth_gb_per_s(), "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
