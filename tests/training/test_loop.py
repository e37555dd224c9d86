"""Training: GLM example layouts, the loop, and exact resumption."""

import pytest
import torch

from glmkit import GLMForCausalLM
from glmkit.models.positions import SpecialIds, sequence_layout
from glmkit.training.loop import TrainConfig, pretrain_batches, sft_batches, sft_examples, train
from glmkit.training.objectives import (
    IGNORE,
    Specials,
    chat_example,
    collate,
    gmask_example,
    sample_spans,
    span_example,
)

from tiny import EOP, GMASK, MASK, PAD, SOP, tiny_config

SPECIALS = Specials(ids=SpecialIds(bos=SOP, mask=MASK, gmask=GMASK, pad=PAD), eop=EOP)


def test_span_infilling_layout_follows_glm():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]
    e = span_example(tokens, [(2, 4), (5, 6)], SPECIALS)
    assert e.input_ids == [10, 11, MASK, 14, MASK, 16, 17, SOP, 12, 13, SOP, 15]
    assert e.labels == [IGNORE] * 7 + [12, 13, EOP, 15, EOP]
    assert e.positions == [0, 1, 2, 3, 4, 5, 6, 2, 2, 2, 4, 4]
    assert e.block_positions == [0] * 7 + [1, 2, 3, 1, 2]
    assert e.context_length == 7


def test_gmask_and_chat_examples_match_the_inference_layout():
    """What training feeds the model must be exactly what generation will feed it."""
    chat = chat_example([5, 6, 7, GMASK, SOP], [20, 21, 22], SPECIALS)
    assert chat.input_ids == [5, 6, 7, GMASK, SOP, 20, 21, 22]
    assert chat.labels == [IGNORE] * 4 + [20, 21, 22, EOP]
    positions, blocked = sequence_layout(chat.input_ids, SPECIALS.ids, prefer_gmask=False)
    assert positions.tolist() == [chat.positions, chat.block_positions]
    batch = collate([chat], PAD)
    assert torch.equal(batch["attention_mask"][0, 0], blocked)
    g = gmask_example([30, 31, 32, 33], 2, SPECIALS)
    assert g.input_ids == [30, 31, GMASK, SOP, 32, 33] and g.labels == [IGNORE] * 3 + [32, 33, EOP]
    with pytest.raises(ValueError, match=r"\[gMASK\] <sop>"):
        chat_example([5, 6], [1], SPECIALS)


def test_sampled_spans_cover_about_the_ratio_in_order():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        spans = sample_spans(100, 0.15, 3.0, g)
        assert sum(e - s for s, e in spans) == 15
        assert all(0 <= s < e <= 100 for s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_collate_pads_right_and_hides_pads():
    a = chat_example([5, GMASK, SOP], [9], SPECIALS)
    b = chat_example([5, 6, 7, GMASK, SOP], [9, 9], SPECIALS)
    batch = collate([a, b], PAD)
    assert batch["input_ids"][0].tolist() == [5, GMASK, SOP, 9, PAD, PAD, PAD]
    assert batch["labels"][0, 4:].tolist() == [IGNORE] * 3
    assert batch["attention_mask"][0, 0, :, 4:].all()


@pytest.fixture()
def facts():
    return [
        {"prompt": "capital of France?", "response": "Paris", "history": []},
        {"prompt": "法国的首都？", "response": "巴黎", "history": []},
        {"prompt": "2+3?", "response": "5", "history": []},
        {"prompt": "And in words?", "response": "five", "history": [["2+3?", "5"]]},
    ]


def chat_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return GLMForCausalLM(tiny_config(vocab_size=tokenizer.vocab_size, **ids))


def specials_of(tokenizer):
    return Specials(ids=tokenizer.special_ids, eop=tokenizer.eos_token_id)


def test_fine_tuning_teaches_answers_that_chat_then_gives(tokenizer, facts, tmp_path):
    model = chat_model(tokenizer)
    config = TrainConfig(steps=100, batch_size=4, lr=3e-3, warmup_steps=5, eval_every=1000, save_every=1000)
    examples = sft_examples(facts, tokenizer, specials_of(tokenizer), max_len=64)
    metrics = train(model, sft_batches(examples, config), config, tmp_path, progress=False)
    assert metrics["loss"] < 0.1
    for fact in facts:
        history = [tuple(t) for t in fact["history"]]
        assert model.chat(tokenizer, fact["prompt"], history, do_sample=False)[0] == fact["response"]


def test_resumed_training_ends_with_the_same_weights(tokenizer, facts, tmp_path):
    texts = ["the model reads the text and learns " * 4, "模型阅读文本并且学习语言。" * 6]
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    config = TrainConfig(steps=6, batch_size=3, grad_accum=2, lr=1e-3, warmup_steps=2, seq_len=24,
                         eval_every=1000, save_every=1000)
    batches = pretrain_batches(docs, specials_of(tokenizer), config)

    straight = chat_model(tokenizer)
    train(straight, batches, config, tmp_path / "a", progress=False)
    interrupted = chat_model(tokenizer)
    train(interrupted, batches, config, tmp_path / "b", stop_after=3, progress=False)
    resumed = chat_model(tokenizer, seed=123)  # a fresh process would start from other random weights
    train(resumed, batches, config, tmp_path / "b", progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.lm_head.weight, interrupted.lm_head.weight)


def test_schedule_warms_up_then_decays():
    c = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(9) == pytest.approx(1.0)
    assert c.lr_at(10) == pytest.approx(1.0) and c.lr_at(100) == pytest.approx(0.1)
    assert c.lr_at(55) == pytest.approx(0.55)
