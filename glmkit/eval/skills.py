"""Measuring a chat model: exact-match accuracy on held-out questions, and perplexity on held-out text.

Accuracy uses the same path as a user's chat (prompt format, greedy decoding, process_response),
batched through the left-padded generator, which gives the same answers as one prompt at a time.
Perplexity is GLM's own setting: the first half of a document is the bidirectional context with
[gMASK], the second half is generated after <sop>, and only the second half's tokens are scored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from tqdm.auto import tqdm

from glmkit.eval.scoring import pack, part_a, score_packed
from glmkit.generation.generate import greedy_completions
from glmkit.models.glm import GLM
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer


def answer_batch(model: GLM, tokenizer: Tokenizer, records: Sequence[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of chat records ({prompt, history})."""
    fmt = chat_format_for(tokenizer)
    prompts = [fmt.prompt_ids(tokenizer, r["prompt"], [tuple(t) for t in r.get("history", [])]) for r in records]
    answers = greedy_completions(model, prompts, max_new_tokens, fmt.stop_ids(tokenizer))
    return [fmt.parse(tokenizer.decode(a)) for a in answers]


def generation_report(model: GLM, tokenizer: Tokenizer, records: Sequence[dict], batch_size: int = 16,
                      max_new_tokens: int = 128, progress: bool = True) -> tuple[dict, list[str]]:
    """BLEU-4 / ROUGE-1/2/L / exact match of greedy answers against the records' responses, and the answers."""
    from glmkit.eval.metrics import generation_scores  # jieba loads its dictionary on first use

    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt"]))  # less padding
    answers: list[str] = [""] * len(records)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress):
        rows = order[start:start + batch_size]
        for i, answer in zip(rows, answer_batch(model, tokenizer, [records[i] for i in rows], max_new_tokens),
                             strict=True):
            answers[i] = answer
    return generation_scores(answers, [r["response"] for r in records]), answers


def language_of(text: str) -> str:
    """"zh" when Chinese characters outnumber Latin letters, else "en" (an English answer may quote a Chinese word)."""
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    latin = sum(ch.isascii() and ch.isalpha() for ch in text)
    return "zh" if cjk > latin else "en"


def exact_match(model: GLM, tokenizer: Tokenizer, records: Sequence[dict], batch_size: int = 32,
                max_new_tokens: int = 48, progress: bool = True) -> dict[str, dict]:
    """Accuracy per "skill/lang" (and "all"), comparing cleaned-up answers exactly; also per phrasing
    ("by_template", for records that carry a template id), answer language, and a few samples."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_phrasing: dict[tuple[str, object], list] = defaultdict(lambda: [0, 0, ""])
    same_language: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    samples: dict[str, list] = defaultdict(list)
    # Similar lengths together: less padding, and padding does not change answers anyway.
    ordered = sorted(records, key=lambda r: len(r["prompt"]) + sum(len(q) + len(a) for q, a in r.get("history", [])))
    for start in tqdm(range(0, len(ordered), batch_size), desc="evaluating", disable=not progress):
        batch = ordered[start:start + batch_size]
        for record, answer in zip(batch, answer_batch(model, tokenizer, batch, max_new_tokens), strict=True):
            ok = answer == chat_format_for(tokenizer).parse(record["response"])
            for key in (f"{record['skill']}/{record['lang']}", "all"):
                hits[key][0] += ok
                hits[key][1] += 1
            if "template" in record:
                row = by_phrasing[(f"{record['skill']}/{record['lang']}", record["template"])]
                row[:] = row[0] + ok, row[1] + 1, row[2] or record["prompt"]
            expected_language = language_of(record["response"])
            same_language[expected_language][0] += language_of(answer) == expected_language
            same_language[expected_language][1] += 1
            if len(samples[record["skill"]]) < 3:
                samples[record["skill"]].append({"prompt": record["prompt"], "expected": record["response"],
                                                  "answer": answer})
    report = {k: {"correct": c, "total": n, "accuracy": round(c / n, 4)} for k, (c, n) in sorted(hits.items())}
    report["samples"] = dict(samples)
    # Per phrasing (template id), with one of its questions: which wordings the model has not generalised to.
    report["by_template"] = {f"{key}#{template}": {"correct": c, "total": n, "accuracy": round(c / n, 4),
                                                   "example": example}
                             for (key, template), (c, n, example) in sorted(by_phrasing.items(), key=_by_id)}
    # Whether answers come in the language the reference answer is in (that of the question, except for
    # poems, whose lines are Chinese whatever the question's language).
    report["answer_language_match"] = {k: round(c / n, 4) for k, (c, n) in sorted(same_language.items())}
    return report


def _by_id(item: tuple[tuple[str, object], list]) -> tuple[str, int, str]:
    """skill/lang, then template ids in numeric order (2 before 10); ids that are not numbers last."""
    (key, template), _ = item
    text = str(template)
    return key, int(text) if text.isdigit() else 1 << 62, text


def skill_rows(report: dict) -> dict[str, dict]:
    """The per-"skill/lang" rows (and "all") of an `exact_match` report, without its other sections."""
    return {k: v for k, v in report.items() if k not in ("samples", "answer_language_match", "by_template")}


def perplexity(model: GLM, tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int = 256,
               batch_size: int = 16) -> float:
    """exp(mean NLL) of each text's second half given its first half, scored as `glmkit eval` scores answers."""
    special, layout = model.special_ids, model.position_layout
    max_tokens = min(max_tokens, model.config.max_sequence_length - 2)  # room for [gMASK] and <sop>
    rows = []
    for text in texts:
        tokens = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        if len(tokens) >= 4:
            cut = len(tokens) // 2
            rows.append(pack(part_a(tokens[:cut], special, gmask=True, layout=layout), [tokens[cut:]], special, layout))
    if not rows:
        raise ValueError("no text long enough to measure perplexity")
    scores = [row[0] for start in range(0, len(rows), batch_size)
              for row in score_packed(model, rows[start:start + batch_size])]
    return math.exp(-sum(s.logprob for s in scores) / sum(s.tokens for s in scores))
