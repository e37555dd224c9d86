"""Generation on a tiny ChatGLM2-layout model (causal, GQA): glmkit.generation goes through the model's position
layout, so greedy, sampled, batched and beam decoding work unchanged; the GQA KV cache gives what full
recomputation gives. INT8/INT4 weight-only quantization runs on the layout too."""

import pytest
import torch

from glmkit import GLMForCausalLM
from glmkit.parallel import tp as tp_lib
from glmkit.quant.quantize import quantize_model

from layouts import VOCAB, thudm_config, thudm_state, write_checkpoint

PROMPT = [5, 9, 100, 3, 77, 12]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = write_checkpoint(tmp_path_factory.mktemp("chatglm2"), thudm_state(), thudm_config(eos_token_id=2))
    return GLMForCausalLM.from_pretrained(directory, progress=False, dtype="float32")


@torch.no_grad()
def recomputed_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Each token the argmax of a full forward over everything so far: no cache at all."""
    ids = list(ids)
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1]
        logits[list(model.config.stop_token_ids)] = -float("inf")
        ids.append(int(logits.argmax()))
    return ids


def test_greedy_generate_equals_step_by_step_recomputation(model):
    got = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert got[0].tolist() == recomputed_greedy(model, PROMPT, 12)


def test_a_batch_of_different_lengths_gives_each_prompt_its_own_answer(model):
    short = [7, 8, 9]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(p):]
             for p in (PROMPT, short)]
    batch = model.generate(torch.tensor([PROMPT, [0] * 3 + short]), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False)
    # Left-padded the official tokenizer's way: pads hidden, positions restart at the first real token.
    assert batch[0, len(PROMPT):].tolist() == alone[0].tolist()
    assert batch[1, len(PROMPT):].tolist() == alone[1].tolist()


def test_sampling_and_beam_search_run(model):
    torch.manual_seed(0)
    sampled = model.generate(torch.tensor([PROMPT]), max_new_tokens=5, do_sample=True, top_p=0.9, temperature=0.8)
    beams = model.generate(torch.tensor([PROMPT]), max_new_tokens=5, num_beams=3, do_sample=False)
    assert sampled.shape[1] <= len(PROMPT) + 5 and beams.shape[1] <= len(PROMPT) + 5
    assert all(0 <= t < VOCAB for t in beams[0].tolist())


def fake_quantized(model, bits: int):
    """The reference: every block linear's weight rounded per output row to `bits`, kept in float."""
    top = 127 if bits == 8 else 7
    copy = GLMForCausalLM.from_pretrained(model.name_or_path, progress=False)
    with torch.no_grad():
        for name, module in copy.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                scale = module.weight.abs().amax(1, keepdim=True) / top
                module.weight.copy_((module.weight / scale).round().clamp(-top - 1, top) * scale)
    return copy


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_quantization_matches_rounded_weights(model, bits):
    """The quantized layers compute what the rounded weights compute (the tiny random model itself is far more
    sensitive to rounding than a trained one, so closeness to fp32 is not the measure here)."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        scale = model(ids).logits.abs().max()
        quantized = quantize_model(GLMForCausalLM.from_pretrained(model.name_or_path, progress=False), bits)(ids).logits
        reference = fake_quantized(model, bits)(ids).logits
    assert (quantized - reference).abs().max() / scale < 0.05


def test_tensor_parallelism_takes_the_layout_and_refuses_sizes_that_do_not_divide_in_one_line(model):
    for tp in (1, 2, 4):  # 2 KV heads: split at 2, replicated at 4 (tests/parallel/test_tp.py runs them)
        tp_lib.check_divisible(model.config, tp)
    with pytest.raises(tp_lib.TPError, match="num_attention_heads 4 does not divide by --tp 3") as error:
        tp_lib.check_divisible(model.config, 3)
    assert len(str(error.value).splitlines()) == 1
