"""What a bf16 or INT8 KV cache costs in exactness, against the model's own fp32 cache, through the engine.

For each prompt the engine answers greedily with each cache dtype (logprobs of the top 5 at every step). Reported
per dtype: how many replies are token for token the fp32 cache's, the steps until the first differing token, and
the largest and mean gap of the chosen token's log-probability over the steps before any difference.

    python bench/kv_cache_quality.py [--model PATH] [--new-tokens 48] [--out FILE]

Default model: the shipped demo model (fp32), on 20 chat questions in English and Chinese of the skills it learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit  # noqa: E402
from glmkit.engine import Engine  # noqa: E402
from glmkit.generation.sampling import SamplingParams  # noqa: E402
from glmkit.perf.speed import machine  # noqa: E402
from glmkit.text.formats import chat_format_for  # noqa: E402

QUESTIONS = ["What is the capital of France?", "法国的首都是哪里？", "Translate 'apple' into Chinese.",
             "把“苹果”翻译成英文。", "What is 23 + 58?", "23加58等于多少？", "Tell me about yourself.", "你好，你是谁？",
             "What is the capital of Japan?", "日本的首都是哪里？", "What is 7 times 8?", "7乘以8等于多少？",
             "Translate 'water' into Chinese.", "把“水”翻译成英文。", "What is the capital of Egypt?",
             "埃及的首都是哪里？", "Say hello.", "请写一句诗。", "What is 91 - 46?", "91减46等于多少？"]


def answers(model, prompts: list[list[int]], new_tokens: int, kv_dtype: str | None) -> list[list]:
    engine = Engine(model, max_batch=8, kv_dtype=kv_dtype)
    params = SamplingParams(max_new_tokens=new_tokens, eos_token_ids=(-1,))
    requests = [engine.add_request(p, params, logprobs=1) for p in prompts]
    outputs: dict[str, list] = {r.request_id: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return [outputs[r.request_id] for r in requests]


def compare(reference: list[list], other: list[list]) -> dict:
    same, agree_steps, gaps = 0, [], []
    for want, got in zip(reference, other, strict=True):
        tokens_w, tokens_g = [o.token_id for o in want], [o.token_id for o in got]
        same += tokens_w == tokens_g
        steps = next((i for i, (a, b) in enumerate(zip(tokens_w, tokens_g, strict=True)) if a != b), len(tokens_w))
        agree_steps.append(steps)
        gaps += [abs(w.logprob.logprob - g.logprob.logprob) for w, g in zip(want[:steps], got[:steps], strict=True)]
    return {"identical_replies": same, "replies": len(reference),
            "median_steps_before_first_difference": statistics.median(agree_steps),
            "max_logprob_gap": round(max(gaps), 5), "mean_logprob_gap": round(statistics.fmean(gaps), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = glmkit.load(args.model, progress=False)
    model = model.float()
    fmt = chat_format_for(tokenizer)
    prompts = [fmt.prompt_ids(tokenizer, q) for q in QUESTIONS]
    reference = answers(model, prompts, args.new_tokens, "float32")
    result = {"machine": machine(), "model": str(args.model or "demo"), "new_tokens": args.new_tokens,
              "load_average_1min": round(os.getloadavg()[0], 2), "against": "float32 KV cache",
              "kv_dtypes": {dtype: compare(reference, answers(model, prompts, args.new_tokens, dtype))
                            for dtype in ("bfloat16", "int8")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
