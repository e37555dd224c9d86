"""Text-generation metrics as the official P-Tuning scripts report them (ChatGLM-6B `ptuning/main.py`).

Per example, then averaged and scaled to 0-100:
- BLEU-4 on characters (NLTK's sentence_bleu with smoothing method 3, the NIST geometric sequence:
  the k-th n-gram order with no match counts as 1 / (2^k * its n-gram count));
- ROUGE-1, ROUGE-2 and ROUGE-L F-scores on jieba words (rouge-chinese's definitions: n-grams are
  counted as sets, ROUGE-L is the longest common subsequence, F = 2PR / (P + R + 1e-8)).
Written from those definitions; the tests check them against NLTK and rouge-chinese themselves.
An empty prediction scores 0 (the official script would stop with an error on it).

Exact match and F1 for `glmkit eval`'s generation tasks are GLM-130B's (`evaluation/metrics.py`, from
SQuAD): answers normalised, F1 over words, the best score over the accepted answers.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence

BLEU_ORDER = 4


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def sentence_bleu(reference: Sequence, hypothesis: Sequence, order: int = BLEU_ORDER) -> float:
    """BLEU of one hypothesis against one reference, uniform weights, smoothing method 3."""
    if not hypothesis:
        return 0.0
    precisions = []
    for n in range(1, order + 1):
        counts = Counter(ngrams(hypothesis, n))
        ref_counts = Counter(ngrams(reference, n))
        matched = sum(min(c, ref_counts[g]) for g, c in counts.items())
        precisions.append((matched, max(1, sum(counts.values()))))
    if precisions[0][0] == 0:
        return 0.0
    log_sum, misses = 0.0, 0
    for matched, total in precisions:
        if matched == 0:
            misses += 1
            log_sum += math.log(1 / (2 ** misses * total))
        else:
            log_sum += math.log(matched / total)
    return brevity_penalty(len(reference), len(hypothesis)) * math.exp(log_sum / order)


def brevity_penalty(reference_length: int, hypothesis_length: int) -> float:
    if hypothesis_length > reference_length:
        return 1.0
    if hypothesis_length == 0:
        return 0.0
    return math.exp(1 - reference_length / hypothesis_length)


def _f_score(overlap: int, hypothesis_count: int, reference_count: int) -> float:
    precision = overlap / hypothesis_count if hypothesis_count else 0.0
    recall = overlap / reference_count if reference_count else 0.0
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_n(reference: Sequence[str], hypothesis: Sequence[str], n: int) -> float:
    hyp, ref = set(ngrams(hypothesis, n)), set(ngrams(reference, n))
    return _f_score(len(hyp & ref), len(hyp), len(ref))


def lcs_length(a: Sequence, b: Sequence) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    return _f_score(lcs_length(reference, hypothesis), len(hypothesis), len(reference))


def words(text: str) -> list[str]:
    """jieba's segmentation without the whitespace tokens (rouge-chinese drops them too)."""
    try:
        import jieba
    except ImportError as e:  # a declared dependency; only a hand-made environment lacks it
        raise ImportError("ROUGE on Chinese needs jieba: pip install jieba") from e
    jieba.setLogLevel(60)  # its dictionary-loading chatter goes to stderr otherwise
    return " ".join(jieba.cut(text)).split()


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-1/2/L (0-100) over pairs, plus exact match, as the official report."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    totals: dict[str, float] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = words(prediction), words(reference)
        totals["bleu-4"] += sentence_bleu(list(reference), list(prediction))
        if hyp and ref:
            totals["rouge-1"] += rouge_n(ref, hyp, 1)
            totals["rouge-2"] += rouge_n(ref, hyp, 2)
            totals["rouge-l"] += rouge_l(ref, hyp)
        totals["exact_match"] += prediction.strip() == reference.strip()
    count = len(references)
    scores = {k: round(100 * totals[k] / count, 4) for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")}
    scores["count"] = count
    return scores


# ----- exact match and F1 (GLM-130B's `evaluation/metrics.py`, SQuAD's definitions) -----

def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, English articles and extra spaces.

    The official list of punctuation is ASCII only; Chinese punctuation (。，“”) is dropped here too,
    so a Chinese answer is not marked wrong for its full stop."""
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def answer_tokens(text: str) -> list[str]:
    """Words for F1: whitespace-separated words, with every Chinese character a word of its own
    (SQuAD splits on spaces only, which would make a Chinese answer one word)."""
    return re.findall(r"[\u4e00-\u9fff]|[^\s\u4e00-\u9fff]+", normalize_answer(text))


def exact_match_score(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    """A prediction scores its best match among the accepted answers (0 when there are none)."""
    return max((metric(prediction, r) for r in references), default=0.0)
