"""Text-generation metrics as the official P-Tuning scripts report them (ChatGLM-6B `ptuning/main.py`).

Per example, then averaged and scaled to 0-100:
- BLEU-4 on characters (NLTK's sentence_bleu with smoothing method 3, the NIST geometric sequence:
  the k-th n-gram order with no match counts as 1 / (2^k * its n-gram count));
- ROUGE-1, ROUGE-2 and ROUGE-L F-scores on jieba words (rouge-chinese's definitions: n-grams are
  counted as sets, ROUGE-L is the longest common subsequence, F = 2PR / (P + R + 1e-8)).
Written from those definitions; the tests check them against NLTK and rouge-chinese themselves.
An empty prediction scores 0 (the official script would stop with an error on it).
"""

from __future__ import annotations

import math
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
