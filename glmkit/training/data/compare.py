"""A skill the demo model does not have, to show fine-tuning: "which of two numbers is larger", in
English and Chinese. Held-out questions use operand pairs never seen in training (either order).

    Which is larger, 37 or 52?   ->  52 is larger.
    37和52哪个大？                ->  52更大。
"""

from __future__ import annotations

import random

TEMPLATES = {
    "en": (["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "Of {a} and {b}, which is greater?",
            "Which is the larger number, {a} or {b}?"], "{m} is larger."),
    "zh": (["{a}和{b}哪个大？", "{a}与{b}相比，哪个更大？", "比较{a}和{b}，哪个大？", "{a}和{b}中哪个数更大？"], "{m}更大。"),
}


def _held_out(a: int, b: int) -> bool:
    """About one pair in five, the same for (a, b) and (b, a)."""
    low, high = sorted((a, b))
    return (low * 31 + high * 17) % 5 == 0


def compare_records(split: str, count: int, seed: int = 0, low: int = 10, high: int = 99) -> list[dict]:
    """`count` records per language, {skill, lang, prompt, response, history}, for split train or heldout."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, not {split!r}")
    rng = random.Random(f"compare-{split}-{seed}")
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)
             if a != b and _held_out(a, b) == (split == "heldout")]
    records = []
    for lang, (questions, answer) in TEMPLATES.items():
        for a, b in rng.sample(pairs, count):
            records.append({"skill": "compare", "lang": lang, "history": [],
                            "prompt": rng.choice(questions).format(a=a, b=b),
                            "response": answer.format(m=max(a, b))})
    return records
