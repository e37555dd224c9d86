"""Peak memory per rank at TP=1 and TP=2, on a random fp32 model of about 1.5 GB.

    python bench/tp_memory.py --work /tmp/tp-bench [--out bench/results/tp_memory.json]

Builds and saves the model once (safetensors, fp32), then loads it and generates a few tokens in a
fresh process at TP=1, and under `torchrun --nproc-per-node 2 ... --tp 2`; each rank reports its
peak resident memory (VmHWM) and what it holds after loading (anonymous and file-backed pages).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32768, hidden_size=2048, num_layers=6, num_attention_heads=16, inner_hidden_size=8192,
             max_sequence_length=512, bos_token_id=32004, eos_token_id=32005, mask_token_id=32000,
             gmask_token_id=32001, pad_token_id=3, torch_dtype="float32")


def build(directory: Path) -> None:
    from glmkit.models.config import GLMConfig
    from glmkit.perf.speed import random_model

    if (directory / "config.json").exists():
        return
    random_model(GLMConfig(**SHAPE), torch.float32).save_pretrained(directory, max_shard_size="4GB")


def memory_mib() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def measure(directory: Path, tp: int) -> list[dict]:
    """Load at `tp`, generate 16 tokens from a 64-token prompt; every rank's memory, gathered."""
    from glmkit import GLMForCausalLM, SamplingParams
    from glmkit.generation.generate import generate

    before = memory_mib()  # torch and glmkit imported, nothing loaded
    model = GLMForCausalLM.from_pretrained(directory, tp=tp, progress=False)
    loaded = memory_mib()
    prompt = torch.tensor([[*range(100, 162), SHAPE["gmask_token_id"], SHAPE["bos_token_id"]]])
    generate(model, prompt, SamplingParams(max_new_tokens=16))
    row = {"before_load": before, "after_load": loaded, "after_generate": memory_mib()}
    if tp == 1:
        return [row]
    import torch.distributed as dist

    rows = [None] * tp
    dist.all_gather_object(rows, row)
    return rows


def run(args: list[str], tp: int) -> list[dict]:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"tp_memory_{tp}.json"
    launcher = [sys.executable] if tp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc-per-node={tp}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*launcher, __file__, *args, "--tp", str(tp), "--result", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True, help="where the random model is saved")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--tp", type=int, default=0, help=argparse.SUPPRESS)  # set for the measuring processes
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = args.work / "model"
    if args.tp:
        rows = measure(model_dir, args.tp)
        if int(os.environ.get("RANK", "0")) == 0:
            args.result.write_text(json.dumps(rows))
        return
    build(model_dir)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    tp1, tp2 = run(["--work", str(args.work)], 1), run(["--work", str(args.work)], 2)
    peak1 = tp1[0]["after_generate"]["VmHWM"]
    model1 = peak1 - tp1[0]["before_load"]["RssAnon"] - tp1[0]["before_load"]["RssFile"]
    model2 = [r["after_generate"]["VmHWM"] - r["before_load"]["RssAnon"] - r["before_load"]["RssFile"] for r in tp2]
    result = {
        "shape": SHAPE, "weights_mib": round(weights / 2**20, 1), "torch": torch.__version__,
        "tp1": tp1, "tp2": tp2,
        "peak_rss_mib": {"tp1": round(peak1, 1), "tp2_per_rank": [round(r["after_generate"]["VmHWM"], 1) for r in tp2]},
        "peak_ratio_tp2_over_tp1": round(max(r["after_generate"]["VmHWM"] for r in tp2) / peak1, 3),
        # the peak less what the process held before loading (the torch runtime): the model's own share
        "model_peak_mib": {"tp1": round(model1, 1), "tp2_per_rank": [round(m, 1) for m in model2]},
        "model_peak_ratio_tp2_over_tp1": round(max(model2) / model1, 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
