"""The CPU inference table: load time, prefill and decode speed, peak RSS for fp32, bf16, INT8, INT4.

Each configuration runs in its own `glmkit bench` process, so each peak RSS is its own. fp32 at the
ChatGLM-6B shape needs 24.8 GB of weights and is skipped on machines with less memory than that.
Prints JSON (and writes it with --out).

    python bench/cpu_inference.py --shape chatglm-6b --threads 2 --out bench/results/cpu-chatglm-6b.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"],
           "int8": ["--bits", "8", "--dtype", "bfloat16"], "int4": ["--bits", "4", "--dtype", "bfloat16"],
           # glmkit's native kernels take fp32 activations as fast as bf16, and the rest of the model
           # (norms, attention) is faster in fp32 on AVX2; INT8 embeddings keep the table small
           "int8-qe-fp32": ["--bits", "8", "--quantize-embeddings", "--dtype", "float32"],
           "int4-qe-fp32": ["--bits", "4", "--quantize-embeddings", "--dtype", "float32"],
           "int4-qe-bf16": ["--bits", "4", "--quantize-embeddings", "--dtype", "bfloat16"],
           # INT4 table too: decoding reads the 130528-row output table for every token
           "int4-qe4-fp32": ["--bits", "4", "--embedding-bits", "4", "--dtype", "float32"],
           "int4-qe4-bf16": ["--bits", "4", "--embedding-bits", "4", "--dtype", "bfloat16"]}
FP32_BYTES_6B = 6.2e9 * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="chatglm-6b", choices=["chatglm-6b", "tiny"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", nargs="+", default=["32", "512"])
    parser.add_argument("--repeats", default="1", help="prefill repeats per length (median)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results, skipped, machine = [], {}, None
    for name in args.configs:
        if name == "fp32" and args.shape == "chatglm-6b" and memory < FP32_BYTES_6B * 1.05:
            skipped[name] = f"needs {FP32_BYTES_6B / 2**30:.1f} GiB of weights; this machine has {memory / 2**30:.1f}"
            continue
        cmd = [sys.executable, "-m", "glmkit", "bench", "--shape", args.shape, *CONFIGS[name], "--threads",
               str(args.threads), "--new-tokens", str(args.new_tokens), "--prompt-len", *args.prompt_len,
               "--repeats", args.repeats, "--load", "--json"]
        print(f"running {name}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        machine = out["machine"]
        results.append({"config": name, **out["results"][0]})
    text = json.dumps({"machine": machine, "command": " ".join(sys.argv), "results": results, "skipped": skipped},
                      indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
