"""glmkit eval on the causal GLMs (ChatGLM2/3, GLM-4): packed answers score as each answer read alone after
`[gMASK] <sop> context`, left to right; the shipped tasks run end to end on a ChatGLM3-layout model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from glmkit import GLMForCausalLM
from glmkit.cli import main
from glmkit.eval.scoring import generation_prompt, pack, part_a, score_packed
from glmkit.eval.task_config import parse_task
from glmkit.eval.task_data import Document
from glmkit.eval.tasks import Run, perplexity
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT

from layouts import thudm_config

CONTEXT = [10, 11, 12, 13, 14, 15, 16]
CHOICES = [[20, 21, 22], [30], [40, 41], [50, 51, 52, 53]]


@pytest.fixture(scope="module")
def model() -> GLMForCausalLM:
    torch.manual_seed(0)
    model = GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=256, seq_length=128)))
    # The ids the prompts start with, inside this tiny vocabulary.
    model.config.gmask_token_id, model.config.bos_token_id, model.config.mask_token_id = 250, 251, 249
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def alone(model, sequence: list[int], start: int, answer: list[int]) -> float:
    """The answer's summed log-probability, each token predicted by the one before it, in one plain sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float().log_softmax(-1)
    return sum(float(logits[start - 1 + i, token]) for i, token in enumerate(answer))


def test_a_causal_context_starts_with_the_prompt_prefix_and_has_no_mask(model):
    special, layout = model.special_ids, model.position_layout
    assert part_a(CONTEXT, special, True, layout) == [250, 251, *CONTEXT]
    assert part_a([*CONTEXT, 249], special, False, layout) == [250, 251, *CONTEXT, 249]
    assert generation_prompt(CONTEXT, special, True, layout) == [250, 251, *CONTEXT]


@pytest.mark.parametrize("choices", [CHOICES, [[7], [8], [9]]], ids=["multi-token", "single-token"])
def test_packed_choices_score_as_separate_causal_sequences(model, choices):
    special, layout = model.special_ids, model.position_layout
    a = part_a(CONTEXT, special, True, layout)
    [packed] = score_packed(model, [pack(a, choices, special, layout)])
    for choice, score in zip(choices, packed, strict=True):
        assert score.logprob == pytest.approx(alone(model, [*a, *choice], len(a), choice), abs=1e-4)
        assert score.tokens == len(choice)


def test_causal_packing_does_not_let_choices_see_each_other(model):
    """Changing one choice leaves the others' scores alone."""
    special, layout = model.special_ids, model.position_layout
    base = score_packed(model, [pack(part_a(CONTEXT, special, True, layout), CHOICES, special, layout)])[0]
    changed = score_packed(model, [pack(part_a(CONTEXT, special, True, layout),
                                        [CHOICES[0], [31, 32, 33], *CHOICES[2:]], special, layout)])[0]
    for i in (0, 2, 3):
        assert changed[i].logprob == pytest.approx(base[i].logprob, abs=1e-5)
    assert changed[1].logprob != pytest.approx(base[1].logprob, abs=1e-3)


def test_batched_causal_rows_score_as_unbatched(model):
    special, layout = model.special_ids, model.position_layout
    rows = [pack(part_a(CONTEXT[:n], special, True, layout), CHOICES[: 2 + n % 3], special, layout)
            for n in range(1, 7)]
    batched = score_packed(model, rows)
    for row, scores in zip(rows, batched, strict=True):
        for single, together in zip(score_packed(model, [row])[0], scores, strict=True):
            assert together.logprob == pytest.approx(single.logprob, abs=1e-4)


def test_causal_perplexity_of_one_window_is_the_sequence_loss(model):
    tokens = [(7 * i) % 200 + 20 for i in range(40)]
    config = parse_task({"name": "t", "type": "lm", "path": "x.txt"}, Path("t.yaml"))
    run = Run(model, None, config, batch_size=2, max_length=model.config.max_sequence_length, progress=False)
    tally = perplexity(run, [Document(tokens, words=10, bytes=100)], "test")
    assert tally["nll"] == pytest.approx(-alone(model, [250, 251, *tokens], 2, tokens), rel=1e-5)
    # Windows of 24 tokens: each keeps [gMASK] <sop> and scores every token once.
    small = Run(model, None, config, batch_size=3, max_length=24, progress=False)
    config.generation_length = 8
    windowed = perplexity(small, [Document(tokens, words=10, bytes=100)], "test")
    assert windowed["tokens"] == 40 and windowed["nll"] != tally["nll"]


def test_a_long_context_is_cut_after_the_prompt_prefix(model):
    config = parse_task({"name": "t", "type": "mul", "path": "x.jsonl"}, Path("t.yaml"))
    run = Run(model, None, config, batch_size=1, max_length=12, progress=False)
    packed = run.pack(list(range(20, 40)), [[7, 8], [9]], "item 0")
    assert packed.input_ids[:2] == [250, 251] and len(packed.input_ids) == 12
    # 12 = [gMASK] <sop> + 7 context tokens + blocks [39 7] and [39]: the context's end is kept, 39 opens both.
    assert packed.input_ids[2:packed.context_length] == list(range(32, 39))
    assert packed.input_ids[packed.context_length:] == [39, 7, 39]


def test_shipped_tasks_run_on_a_chatglm3_model(chatglm3_dir, tmp_path, capsys):
    out = tmp_path / "model"
    torch.manual_seed(0)
    GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=65024, seq_length=512))).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(chatglm3_dir / name, out / name)
    report = tmp_path / "r.json"
    assert main(["eval", "--model", str(out), "--limit", "2", "--json", str(report), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["task", "group", "metric", "value", "n"]
    rows = json.loads(report.read_text())["results"]
    metrics = {r["metric"] for r in rows}
    assert {"accuracy", "em", "ppl_token"} <= metrics
    assert all(r["n"] > 0 for r in rows)
