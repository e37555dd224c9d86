"""Run under torchrun by tests/test_tp.py: load each model at --tp N, record logits and greedy tokens.

    torchrun --standalone --nproc-per-node N tests/tp_worker.py --tp N --out DIR MODEL_DIR[:BITS[:GROUP]] ...

Rank 0 writes DIR/<i>.pt per model: the logits of a fixed batch, the greedy tokens, and every rank's
parameter shapes and bytes (gathered), so the test can check that no rank held the whole model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from glmkit import GLMForCausalLM, SamplingParams
from glmkit.generation.generate import generate

PROMPTS = torch.tensor([[5, 17, 42, 9, 88, 251, 252], [3, 3, 60, 7, 130, 251, 252]])  # [gMASK] <sop>, one padded


def run(spec: str, tp: int) -> dict:
    path, bits, group = (spec.split(":") + ["", ""])[:3]
    model = GLMForCausalLM.from_pretrained(path, tp=tp, quantize=int(bits) if bits else None,
                                           group_size=int(group) if group else None, progress=False, tp_timeout=60)
    with torch.inference_mode():
        logits = model(PROMPTS).logits
    tokens = generate(model, PROMPTS, SamplingParams(max_new_tokens=8))
    sampled = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, do_sample=True, top_k=5, seed=3))
    state = model.state_dict()
    holding = {"shapes": {k: tuple(v.shape) for k, v in state.items()},
               "bytes": sum(v.numel() * v.element_size() for k, v in state.items() if k != "lm_head.weight")}
    everyone = [None] * tp
    dist.all_gather_object(everyone, holding) if tp > 1 else everyone.__setitem__(0, holding)
    return {"logits": logits, "tokens": tokens, "sampled": sampled, "ranks": everyone}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for i, spec in enumerate(args.models):
        result = run(spec, args.tp)
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(result, args.out / f"{i}.pt")


if __name__ == "__main__":
    main()
