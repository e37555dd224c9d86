"""How much INT8 and INT4 change a model: logit gap, perplexity, greedy agreement. Prints JSON.

On the shipped demo model (default) or any model directory: the max and mean absolute logit
difference against full precision over held-out text, held-out perplexity (glmkit.eval.skills), and the
share of greedy chat answers that stay identical. Then on a random-weight model with ChatGLM-6B's
ratios (hidden 1024, 4 layers): the logit gap relative to the logits' size, with glmkit's native
kernels (int8 activations) and with PyTorch's ops (float activations), which separates what the
weights' rounding costs from what the activations' rounding adds.

    python bench/quant_quality.py [--model PATH] [--out bench/results/quant-quality-demo.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import glmkit
from glmkit.eval.skills import perplexity
from glmkit.perf.speed import SHAPES
from glmkit.pretrained import GLMForCausalLM
from glmkit.quant import kernels
from glmkit.quant.quantize import quantize_embeddings, quantize_model

# name -> (block linear bits, embedding and output table bits; 0: full precision)
VARIANTS = {"int8": (8, 0), "int4": (4, 0), "int4-qe8": (4, 8), "int4-qe4": (4, 4)}

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


@torch.no_grad()
def random_model_gaps(seed: int = 0) -> dict:
    """Logit gaps of INT8/INT4 against fp32 on random weights, relative to the mean |logit|."""
    config = SHAPES["tiny"]()  # its 4096-token vocabulary and special ids, at ChatGLM-6B's ratios
    config.hidden_size, config.num_layers, config.num_attention_heads, config.inner_hidden_size = 1024, 4, 8, 4096
    torch.manual_seed(seed)
    reference = GLMForCausalLM(config).eval()
    for param in reference.parameters():
        if param.dim() == 2:
            param.normal_(0, 1 / config.hidden_size ** 0.5)
    state = reference.state_dict()
    ids = torch.randint(100, config.mask_token_id, (2, 64))
    ids[:, -2:] = torch.tensor([config.gmask_token_id, config.bos_token_id])
    expected = reference(ids).logits
    scale = expected.abs().mean().item()
    report = {"shape": "hidden 1024, 4 layers, MLP 4096 (ChatGLM-6B ratios)", "mean_abs_logit": round(scale, 4)}
    available = kernels.available
    for path, switch in (("native", available), ("pytorch", lambda: False)):
        if path == "native" and not available():
            continue
        kernels.available = switch
        try:
            for name, (bits, table_bits) in VARIANTS.items():
                model = GLMForCausalLM(config).eval()
                model.load_state_dict(state)
                quantize_model(model, bits)
                if table_bits:
                    quantize_embeddings(model, table_bits)
                gap = (model(ids).logits - expected).abs()
                report[f"{name}_{path}"] = {"max_abs_relative": round(gap.max().item() / scale, 4),
                                               "mean_abs_relative": round(gap.mean().item() / scale, 5),
                                               "same_argmax": round((model(ids).logits.argmax(-1)
                                                                     == expected.argmax(-1)).float().mean().item(), 4)}
        finally:
            kernels.available = available
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    reference, tokenizer = glmkit.load(args.model, progress=False)
    answers = [reference.chat(tokenizer, q, do_sample=False, max_new_tokens=48)[0] for q in QUESTIONS]
    report = {"model": args.model or "demo-model",
              "full_precision": {"perplexity": round(perplexity(reference, tokenizer, TEXTS), 3)}}
    for name, (bits, table_bits) in VARIANTS.items():
        model, _ = glmkit.load(args.model, progress=False, quantize=bits, quantize_embeddings=table_bits)
        same = sum(model.chat(tokenizer, q, do_sample=False, max_new_tokens=48)[0] == a
                   for q, a in zip(QUESTIONS, answers, strict=True))
        report[name] = {"logits": logit_gap(reference, model, tokenizer),
                                "perplexity": round(perplexity(model, tokenizer, TEXTS), 3),
                                "greedy_answers_identical": f"{same}/{len(QUESTIONS)}"}
    report["random_weights"] = random_model_gaps()
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
