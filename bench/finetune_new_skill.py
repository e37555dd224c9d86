"""Teach the shipped demo model a skill it lacks, with each fine-tuning method, and measure forgetting.

The new skill: "which of two numbers is larger", in English and Chinese (glmkit/training/data/compare.py);
held-out questions use operand pairs never seen in training. For each method: held-out accuracy on
the new skill before and after, and held-out accuracy on the demo model's own skills before and
after (what fine-tuning costs the model). Prints JSON; the README quotes it.

    python bench/finetune_new_skill.py --skills runs/demo3/data/sft/heldout.jsonl

--skills is the demo recipe's held-out file (`glmkit data build` writes it); without it, only the
new skill is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from glmkit import load
from glmkit.eval.skills import exact_match, skill_rows
from glmkit.peft.adapters import LoraConfig
from glmkit.perf.speed import machine
from glmkit.training.data.compare import compare_records
from glmkit.training.demo import read_jsonl
from glmkit.training.finetune import FinetuneConfig, finetune
from glmkit.training.loop import TrainConfig

ALL_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# Per method: steps of 16 examples and a learning rate that reach the skill on this model (chosen by
# hand on the training loss; P-Tuning needs more steps, as its users report).
METHODS = {
    "ptuning": dict(steps=800, lr=2e-2, pre_seq_len=32),
    "lora": dict(steps=300, lr=3e-3, lora=LoraConfig(r=8, lora_alpha=32, target_modules=ALL_LINEARS)),
    "full": dict(steps=300, lr=3e-4),
}


def accuracy(model, tokenizer, records) -> dict:
    report = exact_match(model, tokenizer, records, progress=False)
    return {k: v["accuracy"] for k, v in skill_rows(report).items()}


def run(method: str, skills: list[dict] | None, train_count: int, heldout_count: int, bits: int | None) -> dict:
    settings = dict(METHODS[method])
    steps, lr = settings.pop("steps"), settings.pop("lr")
    train = TrainConfig(steps=steps, batch_size=16, lr=lr, min_lr=lr / 10, warmup_steps=0, weight_decay=0.0,
                        eval_every=10**9, save_every=10**9, seq_len=160)
    config = FinetuneConfig(method=method, train=train, max_source_length=96, max_target_length=64, **settings)
    heldout = compare_records("heldout", heldout_count)
    model, tokenizer = load(progress=False, quantize=bits)
    result: dict = {"method": method, "base": f"int{bits}" if bits else "fp32", "steps": steps, "lr": lr,
                    "new_skill_before": accuracy(model, tokenizer, heldout)}
    if skills:
        result["old_skills_before"] = accuracy(model, tokenizer, skills)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        finetune(model, tokenizer, compare_records("train", train_count), Path(out), config, progress=False)
        result["adapter_or_model_bytes"] = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    result["train_s"] = round(time.time() - t0, 1)
    result["new_skill_after"] = accuracy(model, tokenizer, heldout)
    if skills:
        result["old_skills_after"] = accuracy(model, tokenizer, skills)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", type=Path, default=None, help="the demo recipe's held-out chat file")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train", type=int, default=600, help="training questions per language")
    parser.add_argument("--heldout", type=int, default=50, help="held-out questions per language")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="LoRA/P-Tuning on an INT8/INT4 base")
    args = parser.parse_args()
    skills = read_jsonl(args.skills) if args.skills else None
    rows = []
    for method in args.methods:
        if method == "full" and args.quantize:
            continue
        rows.append(run(method, skills, args.train, args.heldout, args.quantize))
        print(json.dumps(rows[-1]), flush=True, file=sys.stderr)
    print(json.dumps({"machine": machine(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
