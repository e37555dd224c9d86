"""Generation: cached decoding, batching, sampling rules, and the positions GLM generates with."""

import pytest
import torch

from glmkit.generation.generate import (
    SamplingParams,
    apply_repetition_penalty,
    decode_one_token,
    prefill,
    stream_tokens,
    top_k_filter,
    top_p_filter,
)
from glmkit.models.positions import MissingSopError, SpecialIds, model_layout, padded_layout

from tiny import EOP, GMASK, MASK, PAD, SOP, prompt, random_model, tiny_config

SPECIAL = SpecialIds(bos=SOP, mask=MASK, gmask=GMASK, pad=PAD)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(eos_token_id=255))  # an eos the random model never picks in a short run


def greedy(model, sequences, n):
    return torch.stack(list(stream_tokens(model, sequences, SamplingParams(max_new_tokens=n))), dim=1)


def test_kv_cache_decoding_equals_full_recomputation(model):
    """Each cached decode step's logits equal a fresh forward over the whole sequence so far, whose
    positions and mask the model derives itself from the ids (the official way)."""
    seq = prompt(11, 22, 33, 44)
    with torch.no_grad():
        logits, state = prefill(model, [seq], total_slots=40)
        for _ in range(12):
            token = logits.argmax(-1)
            seq = seq + [int(token)]
            full = model(torch.tensor([seq])).logits[:, -1]
            torch.testing.assert_close(decode_one_token(model, token, state), full, atol=1e-4, rtol=1e-4)
            logits = full
    model.clear_kv_cache()


def test_batched_left_padded_greedy_equals_one_by_one(model):
    prompts = [prompt(5, 6, 7, 8, 9, 10, 11), prompt(40), prompt(70, 71, 72)]
    batched = greedy(model, prompts, 16)
    for row, p in enumerate(prompts):
        assert batched[row].tolist() == greedy(model, [p], 16)[0].tolist()


def test_generate_returns_prompt_then_new_tokens_and_accepts_tokenizer_padding(model):
    prompts = [prompt(5, 6, 7), prompt(9)]
    batch = padded_layout(prompts, SPECIAL)
    out = model.generate(**batch, max_new_tokens=5)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    alone = model.generate(torch.tensor([prompts[1]]), max_new_tokens=5)
    assert out[1, -5:].tolist() == alone[0, -5:].tolist()


def test_stops_at_eos_and_pads_finished_rows():
    model = random_model(tiny_config())
    first = greedy(model, [prompt(1, 2)], 1)[0, 0].item()
    params = SamplingParams(max_new_tokens=6, eos_token_ids=(first,))
    steps = list(stream_tokens(model, [prompt(1, 2), prompt(3, 4, 5)], params))
    other = greedy(model, [prompt(3, 4, 5)], 6)[0].tolist()
    assert steps[0][0].item() == first
    expected_len = 6 if first not in other else other.index(first) + 1
    assert len(steps) == expected_len
    assert all(s[0].item() == PAD for s in steps[1:])


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    p = [prompt(8, 9, 10)]
    sampled = dict(do_sample=True, temperature=1.5, max_new_tokens=12)
    a = torch.stack(list(stream_tokens(model, p, SamplingParams(seed=7, **sampled))))
    b = torch.stack(list(stream_tokens(model, p, SamplingParams(seed=7, **sampled))))
    c = torch.stack(list(stream_tokens(model, p, SamplingParams(seed=8, **sampled))))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = torch.stack(list(stream_tokens(model, p, SamplingParams(seed=1, top_k=1, **sampled))))
    assert top1.squeeze(-1).tolist() == greedy(model, p, 12)[0].tolist()


def test_budget_respects_max_length_and_context(model):
    p = prompt(*range(10, 20))  # 12 tokens
    assert len(list(stream_tokens(model, [p], SamplingParams(max_length=15)))) == 3
    assert len(list(stream_tokens(model, [p], SamplingParams()))) == model.config.max_sequence_length - 12


def test_prompt_longer_than_the_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt has 97 tokens but the model's context .* is 96"):
        next(stream_tokens(model, [prompt(*[9] * 95)], SamplingParams(max_new_tokens=1)))
    with pytest.raises(ValueError, match="no room under max_length=10"):
        next(stream_tokens(model, [prompt(*[9] * 10)], SamplingParams(max_length=10)))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.tensor([prompt(*[9] * 95)]))


def test_input_without_sop_is_a_clear_error(model):
    with pytest.raises(MissingSopError, match="no <sop>"):
        model(torch.tensor([[5, 6, GMASK]]))
    with pytest.raises(MissingSopError, match="tokenizer.encode"):
        next(stream_tokens(model, [[5, 6, GMASK]], SamplingParams(max_new_tokens=1)))


@pytest.mark.parametrize("bad", [dict(top_p=0), dict(top_k=-1), dict(do_sample=True, temperature=0),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0)])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# --- the sampling rules, against values worked out by hand ---

def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the first two tokens make the nucleus.
    assert torch.isinf(top_p_filter(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.81)).tolist() == [[False, False, False, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(top_p_filter(shuffled, 0.7)).tolist() == [[True, False, True, False]]


def test_nan_scores_fall_back_to_the_configured_token():
    from glmkit.generation.generate import process_logits
    scores = torch.tensor([[float("nan"), 1.0, 2.0]])
    out = process_logits(scores, torch.zeros(1, 3, dtype=torch.bool), SamplingParams(invalid_score_token_id=1))
    assert out.tolist() == [[0.0, 5e4, 0.0]]


# --- positions and masks, against the spec's rules ---

def test_chat_prompt_positions_follow_the_spec():
    # The spec's example: "你好" -> [5, 74874, [gMASK], <sop>] gives positions [0,1,2,2], blocks [0,0,0,1].
    positions, mask = model_layout(torch.tensor([[5, 74, GMASK, SOP]]), SPECIAL)
    assert positions[0].tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_mask_infilling_positions_follow_the_spec():
    # "A [MASK] B <sop> x y": generated tokens take [MASK]'s position (1), blocks count from <sop>.
    ids = torch.tensor([[7, MASK, 8, SOP, 9, 10]])
    positions, mask = model_layout(ids, SPECIAL)
    assert positions[0].tolist() == [[0, 1, 2, 1, 1, 1], [0, 0, 0, 1, 2, 3]]
    assert mask[0, 0, :, :3].any().item() is False  # the context is visible to all
    assert mask[0, 0, 3].tolist() == [False] * 4 + [True] * 2  # <sop> is causal


def test_mask_and_gmask_together_model_prefers_gmask_tokenizer_prefers_mask():
    seq = [7, MASK, 8, GMASK, SOP]
    model_pos, _ = model_layout(torch.tensor([seq]), SPECIAL)
    assert model_pos[0, 0].tolist() == [0, 1, 2, 3, 3]
    tok = padded_layout([seq], SPECIAL)
    assert tok["position_ids"][0, 0].tolist() == [0, 1, 2, 3, 1]


def test_tokenizer_padding_hides_pads_and_restarts_positions():
    batch = padded_layout([prompt(4, 5, 6), prompt(9)], SPECIAL)
    assert batch["input_ids"][1].tolist() == [PAD, PAD, 9, GMASK, SOP]
    assert batch["position_ids"][1].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    blocked = batch["attention_mask"][1, 0]
    assert blocked[:, :2].all() and blocked[:2].all()  # pad columns and rows are blocked
    assert blocked[2:, 2:].int().tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_decoded_tokens_keep_the_mask_position_and_count_blocks(model):
    with torch.no_grad():
        _, state = prefill(model, [prompt(1, 2, 3)], total_slots=10)
        for expected_block in (2, 3, 4):
            decode_one_token(model, torch.tensor([EOP]), state)
            assert state.last_positions[0, :, 0].tolist() == [3, expected_block]
    model.clear_kv_cache()
