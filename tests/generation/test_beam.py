"""Beam search: exact against exhaustive search, one beam is greedy, bans, stopping rules, and the entry points."""

import itertools
import subprocess
import sys

import pytest
import torch

import glmkit
import glmkit.cli
from glmkit.generation.beam import Hypotheses, beam_search, gnmt_penalty, top_candidates
from glmkit.generation.generate import banned_by_ngrams, stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.text.chat_format import CHATGLM_6B

from tiny import prompt, random_model, tiny_config, write_chat_model

# A 12-token vocabulary, so every 3-token answer can be scored: 12^3 = 1728 sequences.
V, MASK12, GMASK12, SOP12, EOS12 = 12, 8, 9, 10, 11


@pytest.fixture(scope="module")
def small_vocab_model():
    config = tiny_config(vocab_size=V, mask_token_id=MASK12, gmask_token_id=GMASK12, bos_token_id=SOP12,
                         eos_token_id=EOS12, pad_token_id=0, tie_word_embeddings=False)
    return random_model(config, seed=0)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(eos_token_id=255))


def exhaustive(model, prompt_ids, steps, alpha):
    """Every answer of up to `steps` tokens (cut at its first end token), scored from full uncached forward
    passes whose positions and mask the model derives from the ids, best first."""
    answers = torch.tensor(list(itertools.product(range(V), repeat=steps)))  # [V^steps, steps]
    ids = torch.cat([torch.tensor(prompt_ids).expand(len(answers), -1), answers], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[:, len(prompt_ids) - 1:-1]  # [N, steps, V]
    token_logp = logp.gather(-1, answers[..., None])[..., 0]  # [N, steps]
    scored = {}
    for answer, row in zip(answers.tolist(), token_logp, strict=True):
        length = answer.index(EOS12) + 1 if EOS12 in answer else steps
        scored[tuple(answer[:length])] = float(row[:length].sum()) / ((5 + length) / 6) ** alpha
    return sorted(scored.items(), key=lambda item: -item[1])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_beam_search_equals_exhaustive_search(small_vocab_model, alpha):
    """With as many beams as 2-token prefixes nothing is pruned, so the ten best beams must be the ten best
    answers of all, scores included; the end token is among them, and the penalty changes the winner."""
    p = [1, 2, 3, GMASK12, SOP12]
    expected = exhaustive(small_vocab_model, p, 3, alpha)[:10]
    beams = beam_search(small_vocab_model, p, SamplingParams(num_beams=V * V, max_new_tokens=3,
                                                             length_penalty=alpha))[:10]
    assert [tuple(b.tokens) for b in beams] == [answer for answer, _ in expected]
    torch.testing.assert_close([b.score for b in beams], [score for _, score in expected], atol=1e-4, rtol=1e-4)
    assert any(b.finished for b in beams) and any(not b.finished for b in beams)
    assert beams[0].tokens == ([EOS12] if alpha < 3 else [0, 7, EOS12])  # a longer answer wins under alpha 3


def greedy(model, p, **options):
    return [int(t) for t in stream_tokens(model, [p], SamplingParams(**options))]


@pytest.mark.parametrize("options", [dict(early_stopping=True), dict(length_penalty=0.0),
                                     dict(early_stopping=True, no_repeat_ngram_size=2, min_new_tokens=3)])
def test_one_beam_is_greedy(small_vocab_model, model, options):
    for m, p in ((small_vocab_model, [4, 5, GMASK12, SOP12]), (model, prompt(7, 8, 9))):
        best = beam_search(m, p, SamplingParams(num_beams=1, max_new_tokens=12, **options))
        assert len(best) == 1 and best[0].tokens == greedy(m, p, max_new_tokens=12, **options)


def test_deterministic_and_ties_go_to_the_lower_index(model):
    params = SamplingParams(num_beams=4, max_new_tokens=10)
    assert beam_search(model, prompt(3, 4), params) == beam_search(model, prompt(3, 4), params)
    scores = torch.tensor([1.0, 3.0, 3.0, float("-inf"), 3.0, 2.0])
    assert top_candidates(scores, 2).tolist() == [1, 2]
    assert top_candidates(scores, 9).tolist() == [1, 2, 4, 5, 0]  # -inf (banned) never becomes a candidate


def test_no_repeat_ngram_size(model):
    p = prompt(5, 5)
    plain = beam_search(model, p, SamplingParams(num_beams=3, max_new_tokens=16))[0].tokens
    assert repeats_a_bigram(plain)  # without the ban this model repeats itself
    beams = beam_search(model, p, SamplingParams(num_beams=3, max_new_tokens=16, no_repeat_ngram_size=2))
    for answer in [b.tokens for b in beams] + [greedy(model, p, max_new_tokens=16, no_repeat_ngram_size=2)]:
        assert len(answer) == 16 and not repeats_a_bigram(answer)


def repeats_a_bigram(tokens):
    grams = list(zip(tokens, tokens[1:], strict=False))
    return len(grams) != len(set(grams))


def test_banned_by_ngrams_rule():
    assert banned_by_ngrams([1, 2, 3, 1, 2], 3) == [3]
    assert banned_by_ngrams([1, 2, 1, 3, 1], 2) == [2, 3]
    assert banned_by_ngrams([4, 4], 1) == [4, 4] and banned_by_ngrams([1, 2], 3) == []


def test_min_new_tokens_bans_the_end_token_before(small_vocab_model):
    p = [1, 2, 3, GMASK12, SOP12]
    assert EOS12 in greedy(small_vocab_model, p, max_new_tokens=8)[:4]  # this prompt ends early...
    for beams in (1, 3):
        found = beam_search(small_vocab_model, p, SamplingParams(num_beams=beams, max_new_tokens=8, min_new_tokens=4,
                                                                 early_stopping=True))
        for beam in found:
            assert EOS12 not in beam.tokens[:4] and len(beam.tokens) >= 4
    assert greedy(small_vocab_model, p, max_new_tokens=8, min_new_tokens=4)[:4].count(EOS12) == 0


def test_stopping_rules_by_hand():
    h = Hypotheses(size=1, alpha=0.0)
    assert not h.done(-5.0, 2, 10, early_stopping=True)  # nothing has finished yet
    h.add([1, 2], -1.0, finished=True)
    assert h.done(-1.2, 2, 10, early_stopping="never")  # -1.2 only falls further
    assert not h.done(-0.9, 2, 10, early_stopping="never")
    h = Hypotheses(size=1, alpha=1.0)
    h.add([1, 2], -1.0, finished=True)  # score -1 / (7/6) = -0.857
    # A running beam at -1.2 may still end at 10 tokens: -1.2 / (15/6) = -0.48 beats it, so "never" goes on;
    # ended at the next step it would score -1.2 / (8/6) = -0.9, so False stops; True stops anyway.
    assert not h.done(-1.2, 2, 10, early_stopping="never")
    assert h.done(-1.2, 2, 10, early_stopping=False) and h.done(-1.2, 2, 10, early_stopping=True)
    assert not h.done(-1.1, 2, 10, early_stopping=False)  # -1.1 / (8/6) = -0.825 would win
    assert h.done(-2.2, 2, 10, early_stopping="never")  # -2.2 / 2.5 = -0.88 cannot
    h.add([3], -0.9, finished=True)  # -0.9 / 1 is worse than -0.857: not kept
    assert [b.tokens for b in h.beams] == [[1, 2]] and h.beams[0].score == pytest.approx(-1 / gnmt_penalty(2, 1.0))


def test_early_stopping_modes_trade_steps_for_score(small_vocab_model):
    calls = []
    hook = small_vocab_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        runs = {}
        for early in (True, False, "never"):
            calls.clear()
            params = SamplingParams(num_beams=2, max_new_tokens=30, length_penalty=2.0, early_stopping=early)
            runs[early] = (beam_search(small_vocab_model, [6, 7, GMASK12, SOP12], params), len(calls))
    finally:
        hook.remove()
    assert all(b.finished for b in runs[True][0])
    assert runs[True][1] <= runs[False][1] <= runs["never"][1] and runs[True][1] < runs["never"][1]
    assert runs[True][0][0].score <= runs[False][0][0].score <= runs["never"][0][0].score


@pytest.mark.parametrize("bad, message", [
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, do_sample=True), "do_sample=False"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(min_new_tokens=5, max_new_tokens=2), "exceeds max_new_tokens"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
])
def test_invalid_beam_params(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


def test_generate_with_beams_returns_each_rows_best_beam(model):
    prompts = [prompt(5, 6, 7), prompt(9)]
    padded = torch.tensor([prompts[0], [3, 3] + prompts[1]])
    out = model.generate(padded, num_beams=3, max_new_tokens=6)
    for row, p in enumerate(prompts):
        best = beam_search(model, p, SamplingParams(num_beams=3, max_new_tokens=6))[0].tokens
        assert out[row, padded.shape[1]:].tolist() == best
    with pytest.raises(ValueError, match="cannot stream"):
        model.stream_generate(padded, num_beams=3)


@pytest.fixture(scope="module")
def chat_model_dir(tokenizer, tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("beam-chat-model"), tokenizer)


def test_chat_and_the_cli_with_beams(chat_model_dir, capsys):
    model, tokenizer = glmkit.load(chat_model_dir, progress=False)
    ids = tokenizer.encode("你好")
    best = beam_search(model, ids, SamplingParams(num_beams=3, max_new_tokens=10, no_repeat_ngram_size=2,
                                                  eos_token_ids=(tokenizer.eos_token_id,)))[0]
    expected = tokenizer.decode([t for t in best.tokens if t != tokenizer.eos_token_id])
    response, history = model.chat(tokenizer, "你好", num_beams=3, max_new_tokens=10, no_repeat_ngram_size=2)
    assert response == CHATGLM_6B.parse(expected) and response
    streamed = [r for r, _ in model.stream_chat(tokenizer, "你好", num_beams=3, max_new_tokens=10,
                                                no_repeat_ngram_size=2)]
    assert streamed == [response]  # one yield, at the end
    with pytest.raises(ValueError, match="do_sample=False"):
        model.chat(tokenizer, "你好", num_beams=3, do_sample=True)
    cli = ["generate", "--model", str(chat_model_dir), "--max-new-tokens", "10", "--num-beams", "3",
           "--no-repeat-ngram-size", "2", "你好"]
    run = [sys.executable, "-m", "glmkit", *cli]
    assert subprocess.run(run, capture_output=True, text=True, timeout=120, check=True).stdout == expected + "\n"
    assert glmkit.cli.main([*cli, "--sample"]) == 2
    assert "do_sample=False" in capsys.readouterr().err


def test_cli_beam_flags():
    from glmkit.cli import build_parser, sampling_kwargs

    def options(*argv):
        return sampling_kwargs(build_parser().parse_args(list(argv)))

    chat = options("chat", "--num-beams", "3", "--early-stopping", "--length-penalty", "0.5")
    assert chat["do_sample"] is False and chat["num_beams"] == 3 and chat["early_stopping"] is True
    assert chat["length_penalty"] == 0.5 and SamplingParams(**chat).num_beams == 3  # chat's sampling gives way
    assert options("chat")["do_sample"] is True and options("chat")["early_stopping"] is False
    gen = options("generate", "x", "--early-stopping", "never", "--min-new-tokens", "2", "--no-repeat-ngram-size", "3")
    assert (gen["early_stopping"], gen["min_new_tokens"], gen["no_repeat_ngram_size"]) == ("never", 2, 3)
