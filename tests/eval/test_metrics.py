"""BLEU-4 and ROUGE as the official P-Tuning scripts compute them, checked against the libraries
those scripts call (NLTK, rouge-chinese) on many pairs, Chinese and English."""

import random

import pytest

from glmkit.eval.metrics import generation_scores, lcs_length, rouge_l, rouge_n, sentence_bleu, words

nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
rouge_chinese = pytest.importorskip("rouge_chinese")

PAIRS = [
    ("这件连衣裙采用了简约的设计，显得优雅大方。", "这款连衣裙设计简约，优雅大方，适合日常穿着。"),
    ("法国的首都是巴黎。", "法国的首都是巴黎。"),
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("37 plus 45 is 82.", "37 + 45 = 82."),
    ("苹果", "apple"),
    ("好的，我知道了！你还有什么问题吗？", "好的。还有问题吗？"),
    ("a", "a b c d e"),
    ("the the the the", "the cat sat on the mat"),
]


def random_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    vocab = list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会") + ["cat", " ", "dog", "。"]
    return [("".join(rng.choices(vocab, k=rng.randint(1, 20))), "".join(rng.choices(vocab, k=rng.randint(1, 20))))
            for _ in range(count)]


def official(prediction: str, reference: str) -> dict[str, float]:
    """What ptuning/main.py's compute_metrics does for one pair."""
    hyp, ref = list(words(prediction)), list(words(reference))
    scores = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    bleu = nltk_bleu.sentence_bleu([list(reference)], list(prediction),
                                   smoothing_function=nltk_bleu.SmoothingFunction().method3)
    return {"rouge-1": scores["rouge-1"]["f"], "rouge-2": scores["rouge-2"]["f"], "rouge-l": scores["rouge-l"]["f"],
            "bleu-4": bleu}


@pytest.mark.parametrize("prediction, reference", PAIRS + random_pairs(40))
def test_each_pair_scores_as_the_official_libraries(prediction, reference):
    want = official(prediction, reference)
    hyp, ref = words(prediction), words(reference)
    assert sentence_bleu(list(reference), list(prediction)) == pytest.approx(want["bleu-4"], abs=1e-9)
    assert rouge_n(ref, hyp, 1) == pytest.approx(want["rouge-1"], abs=1e-9)
    assert rouge_n(ref, hyp, 2) == pytest.approx(want["rouge-2"], abs=1e-9)
    assert rouge_l(ref, hyp) == pytest.approx(want["rouge-l"], abs=1e-9)


def test_scores_are_means_scaled_to_100_with_exact_match():
    predictions, references = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    scores = generation_scores(predictions, references)
    per_pair = [official(p, r) for p, r in PAIRS]
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert scores[key] == pytest.approx(100 * sum(s[key] for s in per_pair) / len(PAIRS), abs=1e-3)
    assert scores["exact_match"] == pytest.approx(100 / len(PAIRS), abs=1e-3)  # only the 首都 pair
    assert scores["count"] == len(PAIRS)


def test_identical_texts_score_100_and_disjoint_ones_0():
    assert generation_scores(["巴黎是法国的首都。"], ["巴黎是法国的首都。"])["rouge-l"] == pytest.approx(100, abs=1e-4)
    assert generation_scores(["巴黎是法国的首都。"], ["巴黎是法国的首都。"])["bleu-4"] == pytest.approx(100)
    zero = generation_scores(["xyz"], ["法国"])
    assert zero["bleu-4"] == zero["rouge-1"] == zero["rouge-l"] == 0


def test_an_empty_prediction_scores_zero_instead_of_failing():
    scores = generation_scores([""], ["法国的首都是巴黎。"])
    assert scores["bleu-4"] == scores["rouge-1"] == scores["rouge-l"] == 0


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length("", "abc") == 0
