"""The small bilingual tasks shipped in `glmkit/assets/tasks`, built from the demo model's held-out data.

Input: a folder written by `glmkit data build` (its `sft/heldout.jsonl` chat examples use phrasings
the demo model never trained on; `pretrain/heldout.jsonl` holds documents it never saw). Output: one
YAML per task and its JSONL/text files, in English and Chinese groups. Multiple-choice distractors
are the right answer rebuilt with another item's fact, so every choice has the answer's exact shape.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from glmkit.text.scripts import is_cjk

PER_GROUP = 40  # examples per task and language
TEXT_CHARS = 4000  # characters of held-out text per language for perplexity
CHOICES = 4

Shape = tuple[str, Callable[[str, str], str]]
# (skill, lang) -> answer shapes: a pattern of the reference answer and how to rebuild it with another
# fact; group 1 is kept, group 2 swapped (translation goes both ways, so it has two shapes per language).
ANSWER_SHAPES: dict[tuple[str, str], list[Shape]] = {
    ("capital", "en"): [(r"^The capital of (.+) is (.+)\.$", lambda a, b: f"The capital of {a} is {b}.")],
    ("capital", "zh"): [(r"^(.+)的首都是(.+)。$", lambda a, b: f"{a}的首都是{b}。")],
    ("capital_reverse", "en"): [(r"^(.+) is the capital of (.+)\.$", lambda a, b: f"{a} is the capital of {b}.")],
    ("capital_reverse", "zh"): [(r"^(.+)是(.+)的首都。$", lambda a, b: f"{a}是{b}的首都。")],
    ("translate", "en"): [(r"^(.+) means '(.+)' in English\.$", lambda a, b: f"{a} means '{b}' in English."),
                          (r"^'(.+)' in Chinese is (.+)\.$", lambda a, b: f"'{a}' in Chinese is {b}.")],
    ("translate", "zh"): [(r"^“(.+)”的英文是 (.+)。$", lambda a, b: f"“{a}”的英文是 {b}。"),
                          (r"^(.+) 的意思是“(.+)”。$", lambda a, b: f"{a} 的意思是“{b}”。")],
}
MULTIPLE_CHOICE = {"capitals": "capital", "countries": "capital_reverse", "translation": "translate"}
TITLES = {"Mr", "Mrs", "Dr", "St"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def choice_records(examples: list[dict], skill: str, lang: str, rng: random.Random) -> list[dict]:
    """Question -> the reference answer among CHOICES answers of the same shape with other facts."""
    chosen = [e for e in examples if e["skill"] == skill and e["lang"] == lang and not e["history"]]
    parsed = []  # (example, match, shape)
    for example in chosen:
        for shape in ANSWER_SHAPES[(skill, lang)]:
            if match := re.match(shape[0], example["response"]):
                parsed.append((example, match, shape))
                break
    facts = {shape: sorted({m.group(2) for _, m, s in parsed if s == shape}) for shape in ANSWER_SHAPES[(skill, lang)]}
    records = []
    for example, match, shape in parsed[:PER_GROUP]:
        others = rng.sample([f for f in facts[shape] if f != match.group(2)], CHOICES - 1)
        choices = [example["response"], *(shape[1](match.group(1), f) for f in others)]
        rng.shuffle(choices)
        records.append({"inputs_pretokenized": example["prompt"], "choices_pretokenized": choices,
                        "label": choices.index(example["response"])})
    return records


def arithmetic_records(examples: list[dict], lang: str) -> list[dict]:
    chosen = [e for e in examples if e["skill"] == "arithmetic" and e["lang"] == lang and not e["history"]]
    return [{"inputs_pretokenized": e["prompt"], "targets_pretokenized": e["response"]} for e in chosen[:PER_GROUP]]


def english_last_words(documents: list[dict], rng: random.Random, context_chars: int = 600) -> list[dict]:
    """One sentence-final word per Austen document: the passage before it is the context."""
    out = []
    for doc in documents:
        if doc["source"] != "r-cran-janeaustenr":
            continue
        text = doc["text"]
        ends = [m for m in re.finditer(r"(?<=[a-z,;]) ([A-Za-z]{3,})\.(?=\s)", text)
                if m.group(1) not in TITLES and m.start() > context_chars // 2]
        if ends:
            m = rng.choice(ends)
            start = text.find(" ", max(0, m.start() - context_chars)) + 1  # begin on a word
            out.append({"inputs_pretokenized": text[start:m.start()], "targets_pretokenized": " " + m.group(1)})
    return out[:PER_GROUP]


def chinese_last_words(documents: list[dict], rng: random.Random, context_lines: int = 4) -> list[dict]:
    """The last character of an idiom from the idiom dictionary, after the entries before it."""
    out = []
    for doc in documents:
        if doc["source"] != "chengyu-cli":
            continue
        lines = doc["text"].split("\n")
        candidates = [i for i, line in enumerate(lines) if i >= context_lines and is_cjk(line.split("（")[0])
                      and len(line.split("（")[0]) == 4]
        for i in rng.sample(candidates, min(2, len(candidates))):
            idiom = lines[i].split("（")[0]
            context = "\n".join([*lines[i - context_lines:i], idiom[:3]])
            out.append({"inputs_pretokenized": context, "targets_pretokenized": idiom[3]})
    return out[:PER_GROUP]


def held_out_text(documents: list[dict], lang: str) -> str:
    parts, size = [], 0
    for doc in documents:
        if doc["lang"] == lang and size < TEXT_CHARS:
            parts.append(doc["text"])
            size += len(doc["text"])
    return "\n\n".join(parts)[:TEXT_CHARS]


def task_yaml(name: str, task_type: str, comment: str, **keys) -> str:
    lines = [f"# {comment}", f"name: {name}", f"type: {task_type}", f"path: {name}", "file-pattern:"]
    suffix = ".txt" if keys.pop("text", False) else ".jsonl"
    lines += [f"  {lang}: {lang}{suffix}" for lang in ("en", "zh")]
    lines += [f"{k.replace('_', '-')}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def build_tasks(data_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write the shipped tasks; returns examples per task and group."""
    examples = read_jsonl(data_dir / "sft" / "heldout.jsonl")
    documents = read_jsonl(data_dir / "pretrain" / "heldout.jsonl")
    rng = random.Random(seed)
    files: dict[str, dict[str, list[dict] | str]] = {}
    for name, skill in MULTIPLE_CHOICE.items():
        files[name] = {lang: choice_records(examples, skill, lang, rng) for lang in ("en", "zh")}
    files["arithmetic"] = {lang: arithmetic_records(examples, lang) for lang in ("en", "zh")}
    files["lastword"] = {"en": english_last_words(documents, rng), "zh": chinese_last_words(documents, rng)}
    files["heldout-text"] = {lang: held_out_text(documents, lang) for lang in ("en", "zh")}
    yamls = {
        "capitals": task_yaml("capitals", "mul", "Which sentence names the country's capital (chat prompt, [gMASK]).",
                              use_task_mask=True, micro_batch_size=16),
        "countries": task_yaml("countries", "mul", "Which sentence names the capital's country.",
                               use_task_mask=True, micro_batch_size=16),
        "translation": task_yaml("translation", "mul", "Which sentence translates the Chinese word.",
                                 use_task_mask=True, micro_batch_size=16),
        "arithmetic": task_yaml("arithmetic", "gen", "Greedy answers to sums and differences, exact match and F1.",
                                micro_batch_size=16, max_gen_length=24),
        "lastword": task_yaml("lastword", "lm", "LAMBADA-style: greedy prediction of a passage's last word.",
                              micro_batch_size=8),
        "heldout-text": task_yaml("heldout-text", "lm", "Perplexity and bits per byte on held-out documents.",
                                  text=True, micro_batch_size=4, metrics="[ppl_token, bpb]"),
    }
    counts = {}
    for name, groups in files.items():
        for lang, content in groups.items():
            target = out_dir / name / (f"{lang}.txt" if isinstance(content, str) else f"{lang}.jsonl")
            if isinstance(content, str):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content, encoding="utf-8")
            else:
                write_jsonl(target, content)
            counts.setdefault(name, {})[lang] = len(content)
        (out_dir / f"{name}.yaml").write_text(yamls[name], encoding="utf-8")
    return counts
