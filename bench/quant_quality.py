"""How much INT8 and INT4 change a model: logit gap, perplexity, greedy agreement. Prints JSON.

On the shipped demo model (default) or any model directory: the max and mean absolute logit
difference against full precision over held-out text, held-out perplexity (glmkit.evaluate), and the
share of greedy chat answers that stay identical.

    python bench/quant_quality.py [--model PATH] [--out bench/results/quant-quality-demo.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import glmkit
from glmkit.evaluate import perplexity

TEXTS = [
    "The capital of France is Paris. It lies on the Seine and is known for its museums and cafes.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "中国的首都是北京。北京是一座历史悠久的城市，有许多名胜古迹。",
]
QUESTIONS = ["What is the capital of France?", "法国的首都是哪里？", "What is 12 + 34?", "23加45等于多少？",
             "How do you say 'water' in Chinese?", "“朋友”用英语怎么说？", "Who are you?", "你是谁？",
             "What is the capital of Japan?", "日本的首都是哪里？", "What is 57 - 18?", "81减27等于多少？"]


@torch.no_grad()
def logit_gap(reference, model, tokenizer) -> dict:
    gaps = []
    for text in TEXTS:
        ids = torch.tensor([tokenizer.encode(text)])
        gaps.append((model(ids).logits - reference(ids).logits).abs())
    every = torch.cat([g.flatten() for g in gaps])
    return {"max_abs": round(every.max().item(), 4), "mean_abs": round(every.mean().item(), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    reference, tokenizer = glmkit.load(args.model, progress=False)
    answers = [reference.chat(tokenizer, q, do_sample=False, max_new_tokens=48)[0] for q in QUESTIONS]
    report = {"model": args.model or "demo-model",
              "full_precision": {"perplexity": round(perplexity(reference, tokenizer, TEXTS), 3)}}
    for bits in (8, 4):
        model, _ = glmkit.load(args.model, progress=False, quantize=bits)
        same = sum(model.chat(tokenizer, q, do_sample=False, max_new_tokens=48)[0] == a
                   for q, a in zip(QUESTIONS, answers, strict=True))
        report[f"int{bits}"] = {"logits": logit_gap(reference, model, tokenizer),
                                "perplexity": round(perplexity(model, tokenizer, TEXTS), 3),
                                "greedy_answers_identical": f"{same}/{len(QUESTIONS)}"}
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
