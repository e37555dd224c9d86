"""Blank infilling: one encoding of the text, equal to re-encoding everything at each step, for 1D and 2D."""

import subprocess
import sys

import pytest
import torch

import glmkit
import glmkit.cli
from glmkit.generation.beam import beam_search
from glmkit.generation.infill import BlankIds, NoBlankError, encode_text, fill_ids, fill_text
from glmkit.generation.sampling import SamplingParams

from tiny import EOP, GMASK, MASK, SOP, random_model, tiny_config, write_chat_model

SMASK = 249  # unused by the tiny vocabulary's other specials
IDS = BlankIds(mask=MASK, smask=SMASK, gmask=GMASK, sop=SOP, eop=EOP)
CONTEXT = [5, 6, MASK, 7, 8, SMASK, 9, 10, 11, GMASK]  # three blanks, the last one [gMASK]


@pytest.fixture(scope="module", params=[True, False], ids=["2d", "1d"])
def model(request):
    """Untied and with a unit residual scale: a random DeepNorm model otherwise mostly echoes its last input,
    whatever the positions, and could not tell a right layout from a wrong one."""
    return random_model(tiny_config(position_encoding_2d=request.param, tie_word_embeddings=False, residual_alpha=1.0))


def reference_fill(model, part_a, budget, eos):
    """(greedy answers, the logits behind each choice [steps, V]), encoding the whole sequence from scratch at
    every step (no cache), with the positions and mask of GLM's Part A / Part B layout written out here."""
    n, two_d = len(part_a), model.config.position_encoding_2d
    ids, position, block = list(part_a), list(range(n)), [0] * n

    def append(token, mask_at, j):
        ids.append(token)
        block.append(j + 1)
        position.append(n + j if not two_d and part_a[mask_at] == GMASK else mask_at)

    spans, choices = [], []
    for mask_at in [i for i, t in enumerate(part_a) if t in (MASK, SMASK, GMASK)]:
        append(SOP, mask_at, 0)
        span = []
        while len(span) < budget:
            allowed = torch.ones(len(ids), len(ids)).tril().bool()
            allowed[:, :n] = True  # Part A is seen by everyone; Part B is causal
            positions = torch.tensor([position, block] if two_d else [position])
            with torch.no_grad():
                logits = model(torch.tensor([ids]), positions[None], ~allowed[None, None]).logits[0, -1]
            choices.append(logits)
            token = int(logits.argmax())
            if token in eos:
                break
            span.append(token)
            append(token, mask_at, len(span))
        spans.append(span)
    return spans, torch.stack(choices)


def counted_fill(model, context, params):
    """(answers, tokens fed by each forward call, each call's last logits)."""
    lengths, logits = [], []

    def record(_module, args, out):
        lengths.append(args[0].shape[1])
        logits.append(out.logits[0, -1])

    hook = model.register_forward_hook(record)
    try:
        return fill_ids(model, context, IDS, params), lengths, torch.stack(logits)
    finally:
        hook.remove()


@pytest.mark.parametrize("ends_early", [False, True])
def test_three_blanks_one_encoding_equal_to_re_encoding(model, ends_early):
    """Every choice is made from the same logits as re-encoding everything, and the text went through the
    model once: the first call, then only <sop>s and answer tokens, at most two at a time."""
    eos = [EOP]
    if ends_early:  # an end token the model does produce: blocks end before the limit
        eos = [fill_ids(model, CONTEXT, IDS, SamplingParams(max_new_tokens=5))[0][1]]
    spans, lengths, logits = counted_fill(model, CONTEXT, SamplingParams(max_new_tokens=5, eos_token_ids=tuple(eos)))
    expected_spans, expected_logits = reference_fill(model, CONTEXT, 5, eos)
    assert spans == expected_spans and len(spans) == 3
    torch.testing.assert_close(logits[1:], expected_logits, atol=1e-4, rtol=1e-4)
    assert lengths[0] == len(CONTEXT) and all(n <= 2 for n in lengths[1:])
    assert sum(lengths[1:]) <= sum(len(s) + 1 for s in spans)
    assert any(len(s) < 5 for s in spans) == ends_early


def test_beams_fill_each_blank_and_hand_the_winner_to_the_next(model):
    """With one token per blank the best beam is the likeliest token, so three blanks filled with beams
    (each winner re-fed after the search forked the cache) must equal greedy re-encoding."""
    for context in (CONTEXT, [5, MASK, 6, MASK, 7, MASK]):
        beams, _, logits = counted_fill(model, context, SamplingParams(max_new_tokens=1, num_beams=3))
        expected_spans, expected_logits = reference_fill(model, context, 1, [EOP])
        assert beams == expected_spans
        torch.testing.assert_close(logits[1:], expected_logits, atol=1e-4, rtol=1e-4)


def test_end_of_text_follows_a_text_that_does_not_end_with_a_blank(model):
    with_end = BlankIds(mask=MASK, smask=SMASK, gmask=GMASK, sop=SOP, eop=EOP, end_of_text=2)
    seen = []
    hook = model.register_forward_hook(lambda _m, args, _o: seen.append(args[0][0].tolist()))
    try:
        fill_ids(model, [5, MASK, 6], with_end, SamplingParams(max_new_tokens=2))
        fill_ids(model, [5, MASK, 6, GMASK], with_end, SamplingParams(max_new_tokens=2))
    finally:
        hook.remove()
    contexts = [s for s in seen if len(s) > 2]
    assert contexts == [[5, MASK, 6, 2], [5, MASK, 6, GMASK]]


def test_errors_say_what_to_do(model):
    with pytest.raises(NoBlankError, match=r"put \[MASK\]"):
        fill_ids(model, [5, 6, 7], IDS, SamplingParams())
    with pytest.raises(ValueError, match="leaves no room .* shorten the text"):
        fill_ids(model, [5] * 95 + [MASK], IDS, SamplingParams())
    with pytest.raises(ValueError, match="no room left for blank 2 of 2"):
        fill_ids(model, [5] * 80 + [MASK, GMASK], IDS, SamplingParams(max_length=84))


@pytest.fixture(scope="module")
def loaded(tokenizer, tmp_path_factory):
    return glmkit.load(write_chat_model(tmp_path_factory.mktemp("infill-model"), tokenizer), progress=False)


def test_text_api_splices_answers_and_a_final_gmask_is_plain_generation(loaded):
    model, tokenizer = loaded
    ids = BlankIds.from_tokenizer(tokenizer)
    text = "hello [MASK] world [sMASK] and more [gMASK]"
    encoded = encode_text(tokenizer, text, ids)
    assert [t for t in encoded if t in (ids.mask, ids.smask, ids.gmask)] == [ids.mask, ids.smask, ids.gmask]
    filled = fill_text(model, tokenizer, text, SamplingParams(max_new_tokens=4))
    a, b, c = filled.answers
    assert filled.text == f"hello {a} world {b} and more {c}" and all(filled.answers)
    assert model.infill(tokenizer, text, max_new_tokens=4) == filled.text
    # "prompt [gMASK]" is exactly the chat layout: the answer is generate's, with beams too.
    prompt_ids = tokenizer.encode("hello")
    for options in (dict(), dict(num_beams=3)):
        params = SamplingParams(max_new_tokens=6, eos_token_ids=(tokenizer.eos_token_id,), **options)
        if options:
            expected = beam_search(model, prompt_ids, params)[0].tokens
        else:
            expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6)[0, len(prompt_ids):].tolist()
        expected = [t for t in expected if t != tokenizer.eos_token_id]
        assert model.infill(tokenizer, "hello[gMASK]", max_new_tokens=6, **options) == "hello" + tokenizer.decode(
            expected)


def test_cli_on_the_demo_model(capsys):
    text = "What is the capital of France?[gMASK]"
    result = subprocess.run([sys.executable, "-m", "glmkit", "infill", "--max-new-tokens", "12", text],
                            capture_output=True, text=True, timeout=120, check=True)
    model, tokenizer = glmkit.load(progress=False)
    assert result.stdout == model.infill(tokenizer, text, max_new_tokens=12) + "\n"
    assert result.stdout.startswith("What is the capital of France?") and len(result.stdout) > len(text)
    assert glmkit.cli.main(["infill", "no blank here"]) == 2
    assert "no blank to fill" in capsys.readouterr().err
