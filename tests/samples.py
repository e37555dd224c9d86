"""Sample text shared by the tokenizer tests and fixtures."""

from __future__ import annotations

import random


def sample_corpus() -> list[str]:
    """A few hundred lines of Chinese, English, Python (spaces and tabs) and numbers, from a fixed seed."""
    rng = random.Random(0)
    hanzi = (
        "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后"
        "多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合"
        "还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只"
        "没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边"
    )
    english = [
        "the", "model", "reads", "writes", "answers", "learns", "data", "text", "code", "language", "token", "vector",
        "layer", "attention", "weight", "train", "test", "small", "large", "fast", "slow", "history", "science",
        "music", "weather", "city", "river", "mountain", "student", "teacher", "computer", "program", "function",
        "value", "number", "result", "question", "example", "simple", "complex", "random", "people", "world", "time",
        "year", "good", "new", "first", "last", "long", "great", "little", "right", "different", "following",
        "important", "public", "bad", "same", "able",
    ]  # fmt: skip
    code = [
        "def add(a, b):\n    return a + b",
        "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
        "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x = x\n\t\tself.y = y",
        "while True:\n    line = input()\n    if not line:\n        break  # 结束",
        "items = [1, 2, 3]\nresult = {k: v * 2 for k, v in enumerate(items)}",
    ]
    zh_punct, en_punct = "，。！？；：", ",.!?;:"
    zh_words = [rng.choice(hanzi) + rng.choice(hanzi) for _ in range(400)]
    lines = []
    for n in range(300):
        words = "".join(rng.choice(zh_words) for _ in range(rng.randint(4, 12)))
        lines.append(words + rng.choice(zh_punct))
        sentence = " ".join(rng.choice(english) for _ in range(rng.randint(5, 14)))
        lines.append(sentence.capitalize() + rng.choice(en_punct) + f" {n * 37 % 1000} {n / 7:.3f}")
    lines += [f"{snippet}\n# {n}: {n * 37 % 1000} 个结果" for n, snippet in enumerate(code * 20)]
    return lines


CHAT_WORDS = ["你好", "[Round 1]", "问：", "答：", "get_weather", "tool_call(city=\"北京\")", "```python", "interpreter",
              "Answer the following questions as best as you can. You have access to the following tools:"]


def corpus_lines() -> list[str]:
    lines = [line for text in sample_corpus() for line in text.split("\n") if line.strip()]
    return lines + CHAT_WORDS * 20
