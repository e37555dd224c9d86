"""KV-cache reuse across chat turns on the causal families: a follow-up turn prefills only what the last turn's
cache does not hold (model.last_prefill counts it), and every answer is the one a full prefill gives."""

from __future__ import annotations

import pytest
import torch

import glmkit
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.generation.chat import role_history
from glmkit.generation.generate import stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.text.chatglm3_tokenizer import ChatGLM3Tokenizer
from glmkit.text.formats import chat_format_for
from glmkit.text.glm4_tokenizer import GLM4Tokenizer

from layouts import thudm_config

QUERIES = ["你好", "What is the weather like?", "tell me more", "北京 get_weather", "thanks, bye"]


def random_causal_model(vocab: int) -> glmkit.GLMForCausalLM:
    torch.manual_seed(0)
    model = glmkit.GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=vocab, seq_length=1024)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def pair(request, chatglm3_dir, glm4_dir):
    if request.param == "chatglm3":
        tokenizer = ChatGLM3Tokenizer.from_pretrained(chatglm3_dir)
    else:
        tokenizer = GLM4Tokenizer.from_pretrained(glm4_dir)
    vocab = -(-len(tokenizer) // 64) * 64
    return random_causal_model(vocab), tokenizer


def prompt_of(tokenizer, query, history) -> list[int]:
    return chat_format_for(tokenizer).prompt_ids(tokenizer, query, role_history(history))


def converse(model, tokenizer, queries, reuse, history=None, **options):
    """Each turn's (response, history, cached, computed, ids the retained cache held before the turn)."""
    options = {"do_sample": False, "max_new_tokens": 10, **options}
    history, turns = list(history or []), []
    for query in queries:
        kept = model.__dict__.get("_retained_kv")
        before = kept.ids if kept is not None else ()
        response, history = model.chat(tokenizer, query, history, reuse_cache=reuse, **options)
        turns.append((response, history, model.last_prefill.cached, model.last_prefill.computed, before))
    return turns


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("options", [{"max_new_tokens": 10}, {"max_length": 400}],
                         ids=["cache-grows", "cache-in-place"])
def test_five_greedy_turns_with_reuse_equal_full_prefill_and_prefill_only_the_new_tokens(pair, options):
    model, tokenizer = pair
    model.clear_kv_cache()
    full = converse(model, tokenizer, QUERIES, reuse=False, **options)
    assert model.__dict__.get("_retained_kv") is None  # reuse off keeps nothing
    reused = converse(model, tokenizer, QUERIES, reuse=True, **options)
    assert [t[:2] for t in reused] == [t[:2] for t in full]  # the same answers and histories, token for token
    assert all(t[2] == 0 for t in full) and reused[0][2] == 0
    history = []
    for turn, (_, new_history, cached, computed, before) in enumerate(reused):
        prompt = prompt_of(tokenizer, QUERIES[turn], history)
        assert cached + computed == len(prompt)
        if turn:
            previous = prompt_of(tokenizer, QUERIES[turn - 1], reused[turn - 2][1] if turn > 1 else [])
            # the cache held the last prompt and its reply; all of the prompt they share is reused
            assert before[: len(previous)] == tuple(previous) and len(before) > len(previous)
            assert cached == min(common_prefix(before, prompt), len(prompt) - 1) >= len(previous)
            assert computed < len(prompt) - len(previous) + 1
        history = new_history


def test_a_continuation_of_the_cached_ids_prefills_only_the_new_ones(pair):
    """When the new prompt repeats the reply's ids as generated (what a format writes back when it re-encodes
    the reply to the same ids), only the ids after them are prefilled: cached = prompt + reply minus the last
    sampled id, which was never fed."""
    model, tokenizer = pair
    prompt = prompt_of(tokenizer, QUERIES[0], [])
    params = SamplingParams(max_new_tokens=6, eos_token_ids=(len(tokenizer) + 1,))
    reply = [int(t[0]) for t in stream_tokens(model, [prompt], params, reuse_cache=True)]
    follow = prompt + reply + tokenizer.encode("more", add_special_tokens=False)
    with_reuse = [int(t[0]) for t in stream_tokens(model, [follow], params, reuse_cache=True)]
    assert model.last_prefill.cached == len(prompt) + len(reply) - 1
    assert model.last_prefill.computed == len(follow) - model.last_prefill.cached
    assert with_reuse == [int(t[0]) for t in stream_tokens(model, [follow], params)]
    assert model.last_prefill.cached == 0 and model.__dict__.get("_retained_kv") is None


def test_an_edited_history_falls_back_to_a_full_prefill_and_stays_exact(pair):
    model, tokenizer = pair
    model.clear_kv_cache()
    turns = converse(model, tokenizer, QUERIES[:3], reuse=True)
    edited = [dict(m) for m in turns[-1][1]]
    edited[0]["content"] = "hello there, edited"  # the first user message: not a continuation any more
    [(response, history, cached, computed, before)] = converse(model, tokenizer, QUERIES[3:4], reuse=True,
                                                               history=edited)
    prompt = prompt_of(tokenizer, QUERIES[3], edited)
    # the ids part inside the first message: only the role tokens and what the edit kept at its start are reused
    assert cached == common_prefix(before, prompt) < len(prompt_of(tokenizer, QUERIES[0], []))
    assert cached + computed == len(prompt)
    model.clear_kv_cache()
    [(expected, expected_history, *_)] = converse(model, tokenizer, QUERIES[3:4], reuse=False, history=edited)
    assert (response, history) == (expected, expected_history)


def test_seeded_sampling_with_reuse_equals_full_prefill(pair):
    """The sampler's generator starts from the seed each turn and draws only after the prefill: same draws."""
    model, tokenizer = pair
    model.clear_kv_cache()
    options = {"do_sample": True, "seed": 7, "top_p": 0.9, "temperature": 1.0, "max_new_tokens": 10}
    full = converse(model, tokenizer, QUERIES, reuse=False, **options)
    reused = converse(model, tokenizer, QUERIES, reuse=True, **options)
    assert [t[:2] for t in reused] == [t[:2] for t in full]
    assert all(t[2] > 0 for t in reused[1:])


def test_any_other_use_of_the_model_in_between_drops_the_cache(pair):
    model, tokenizer = pair
    model.clear_kv_cache()
    (_, history, *_), = converse(model, tokenizer, QUERIES[:1], reuse=True)
    assert model.__dict__.get("_retained_kv") is not None
    model.generate(torch.tensor([prompt_of(tokenizer, "other", [])]), max_new_tokens=3)  # setup + clear
    assert model.__dict__.get("_retained_kv") is None
    (_, history, cached, *_), = converse(model, tokenizer, QUERIES[1:2], reuse=True, history=history)
    assert cached == 0
    # beams prefill in full and keep nothing
    (_, history, cached, *_), = converse(model, tokenizer, QUERIES[2:3], reuse=True, history=history, num_beams=2)
    assert cached == 0 and model.__dict__.get("_retained_kv") is None
    # a model moved to another dtype does not read caches written in the old one
    converse(model, tokenizer, QUERIES[3:4], reuse=True, history=history)
    model.double()
    try:
        (_, _, cached, *_), = converse(model, tokenizer, QUERIES[4:5], reuse=True, history=history)
        assert cached == 0
    finally:
        model.float()
        model.clear_kv_cache()


def test_an_answer_stopped_early_keeps_what_was_fed_and_the_next_turn_stays_exact(pair):
    """The terminal's Ctrl-C closes stream_chat mid-answer: the cache keeps the ids fed so far, and the next turn
    (whose history drops the cut turn) reuses only the prefix it shares with them."""
    model, tokenizer = pair
    model.clear_kv_cache()
    (_, history, *_), = converse(model, tokenizer, QUERIES[:1], reuse=True)
    stream = model.stream_chat(tokenizer, QUERIES[1], history, do_sample=False, max_new_tokens=10)
    next(stream)
    stream.close()
    cut_prompt = prompt_of(tokenizer, QUERIES[1], history)
    assert model.__dict__["_retained_kv"].ids[: len(cut_prompt)] == tuple(cut_prompt)
    (response, new_history, cached, *_), = converse(model, tokenizer, QUERIES[2:3], reuse=True, history=history)
    assert cached >= len(prompt_of(tokenizer, QUERIES[0], []))
    model.clear_kv_cache()
    (expected, expected_history, *_), = converse(model, tokenizer, QUERIES[2:3], reuse=False, history=history)
    assert (response, new_history) == (expected, expected_history)


def test_chatglm_6b_prefix_lm_always_prefills_in_full(tokenizer, tmp_path):
    """ChatGLM-6B's 2D prefix-LM reads the context bidirectionally up to [gMASK] <sop> at the prompt's end: a
    longer conversation changes every cached key, so nothing is kept or reused."""
    from tiny import write_chat_model

    model, tok = glmkit.load(write_chat_model(tmp_path / "chatglm-6b", tokenizer), progress=False)
    _, history = model.chat(tok, "你好", [], do_sample=False, max_length=60)
    assert model.__dict__.get("_retained_kv") is None
    response, _ = model.chat(tok, "再说一遍", history, do_sample=False, max_length=300)
    assert model.last_prefill.cached == 0 and model.__dict__.get("_retained_kv") is None
    assert response == model.chat(tok, "再说一遍", history, do_sample=False, max_length=300, reuse_cache=False)[0]


def test_chatglm2_tuple_history_turns_reuse_and_stay_exact(chatglm2_dir):
    """ChatGLM2's `[Round n]` text format is causal too: its (query, response) turns reuse the cache alike."""
    from glmkit.text.chatglm3_tokenizer import ChatGLM2Tokenizer

    tokenizer = ChatGLM2Tokenizer.from_pretrained(chatglm2_dir)
    model = random_causal_model(-(-len(tokenizer) // 64) * 64)
    runs = {}
    for reuse in (False, True):
        history, turns = [], []
        for query in QUERIES:
            response, history = model.chat(tokenizer, query, history, reuse_cache=reuse, do_sample=False,
                                           max_new_tokens=10)
            turns.append((response, model.last_prefill.cached))
        runs[reuse] = (history, turns)
    assert runs[True][0] == runs[False][0] and [r for r, _ in runs[True][1]] == [r for r, _ in runs[False][1]]
    assert all(cached > 0 for _, cached in runs[True][1][1:])
