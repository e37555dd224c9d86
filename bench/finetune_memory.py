"""Peak memory of one fine-tuning step at the ChatGLM-6B shape (random weights), per method.

Each configuration runs in a fresh process, so its peak RSS is its own: the model is built in its
final form (INT8/INT4 block linears are never full precision), the method attached, then one
optimizer step on a batch of chat examples (forward, backward, AdamW). Everything else is fp32, as
glmkit loads models on CPU (bf16 matmuls are slow on CPUs without native bf16). `--layers N` builds
the 6B width with N blocks: a full-precision base (24.8 GB of fp32 weights) does not fit this
machine's 24 GiB at 28 blocks, so it is measured at 1 and 2 blocks and extrapolated linearly to 28,
and the output says so.

    python bench/finetune_memory.py                      # the whole table (minutes per row on 2 cores)
    python bench/finetune_memory.py --one lora --bits 4  # one row
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from glmkit.checkpoints.hf import release_freed_memory
from glmkit.models.config import preset
from glmkit.models.positions import SpecialIds
from glmkit.peft.adapters import LoraConfig
from glmkit.perf.speed import machine, random_model
from glmkit.training.finetune import FinetuneConfig, prepare, trainable
from glmkit.training.loop import loss_of, make_optimizer
from glmkit.training.objectives import Specials, chat_example, collate

ROWS = [  # (method, bits, layers); full precision does not fit at 28 blocks in 24 GiB, so 1 and 2 are measured
    ("ptuning", 4, 28), ("lora", 4, 28), ("ptuning", 8, 28), ("lora", 8, 28),
    ("ptuning", 0, 1), ("ptuning", 0, 2), ("lora", 0, 1), ("lora", 0, 2), ("full", 0, 1), ("full", 0, 2),
]


def _status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def current_rss_gib() -> float:
    return _status_gib("VmRSS")


def step_peak_rss_gib() -> float:
    return _status_gib("VmHWM")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_step(method: str, bits: int, layers: int, batch: int, source: int, target: int) -> dict:
    config = preset("chatglm-6b", num_layers=layers)
    t0 = time.time()
    model = random_model(config, torch.float32, bits)
    release_freed_memory()
    built_gib = current_rss_gib()
    reset_peak_rss()  # the step's own peak, not the build's temporaries
    ft = FinetuneConfig(method=method, pre_seq_len=128, lora=LoraConfig(r=8, target_modules=["query_key_value"]))
    prepare(model, ft)
    is_trained = trainable(method)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trained(name))
    model.train()
    optimizer = make_optimizer(model, ft.train)
    ids = SpecialIds(bos=config.bos_token_id, mask=config.mask_token_id, gmask=config.gmask_token_id,
                     pad=config.pad_token_id)
    specials = Specials(ids=ids, eop=config.eos_token_id)
    g = torch.Generator().manual_seed(0)
    examples = [chat_example([*torch.randint(5, 20000, (source - 2,), generator=g).tolist(), ids.gmask, ids.bos],
                             torch.randint(5, 20000, (target - 1,), generator=g).tolist(), specials)
                for _ in range(batch)]
    t1 = time.time()
    loss, _ = loss_of(model, collate(examples, config.pad_token_id))
    loss.backward()
    optimizer.step()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "bits": bits or "fp32", "layers": layers, "batch": batch, "tokens": source + target,
            "trained_parameters": trained, "peak_rss_gib": round(step_peak_rss_gib(), 2),
            "model_rss_gib": round(built_gib, 2), "step_s": round(time.time() - t1, 1),
            "build_s": round(t1 - t0, 1), "loss": round(loss.item(), 3)}


def extrapolate(rows: list[dict]) -> list[dict]:
    """28 blocks from the 1- and 2-block measurements of each full-precision method (linear in depth)."""
    for method in ("ptuning", "lora", "full"):
        by_depth = {r["layers"]: r for r in rows if r["method"] == method and r.get("bits") == "fp32"}
        if 1 in by_depth and 2 in by_depth and "peak_rss_gib" in by_depth[1] and "peak_rss_gib" in by_depth[2]:
            per_layer = by_depth[2]["peak_rss_gib"] - by_depth[1]["peak_rss_gib"]
            rows.append({"method": method, "bits": "fp32", "layers": 28,
                         "peak_rss_gib": round(by_depth[1]["peak_rss_gib"] + 27 * per_layer, 1),
                         "extrapolated": f"from 1 and 2 blocks: {per_layer:.2f} GiB per block"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=["ptuning", "lora", "full"], help="run one configuration in this process")
    parser.add_argument("--bits", type=int, default=0)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--batch", type=int, default=1, help="examples per step (the official recipe: 1, x16 accum)")
    parser.add_argument("--source", type=int, default=64, help="prompt tokens (official ADGEN recipe: 64)")
    parser.add_argument("--target", type=int, default=64, help="answer tokens (official ADGEN recipe: 64)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_step(args.one, args.bits, args.layers, args.batch, args.source, args.target)))
        return
    rows = []
    for method, bits, layers in ROWS:
        cmd = [sys.executable, __file__, "--one", method, "--bits", str(bits), "--layers", str(layers),
               "--batch", str(args.batch), "--source", str(args.source), "--target", str(args.target)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        rows.append(json.loads(done.stdout) if done.returncode == 0 else
                    {"method": method, "bits": bits, "layers": layers, "error": done.stderr.strip()[-300:]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"machine": machine(), "rows": extrapolate(rows)}, indent=2))


if __name__ == "__main__":
    main()
