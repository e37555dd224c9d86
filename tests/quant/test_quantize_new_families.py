"""INT8/INT4 on the ChatGLM2/ChatGLM3/GLM-4 architecture (grouped-query attention, SwiGLU, untied output layer):
the native kernels on a tiny GQA model, `--quantize-embeddings` with an untied output layer, and the official
`-int4` layout (THUDM/chatglm2-6b-int4, spec 5.3) written by glmkit and written by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_quantize import PATHS, spec_pack_int4, spec_quantize, take_path

from glmkit import GLMForCausalLM
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.quant.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    block_linears,
    quantize_embeddings,
    quantize_model,
)

from layouts import thudm_config, thudm_state, write_checkpoint

BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
IDS = torch.tensor([[6, 3, 17, 42, 99, 7, 150, 23]])


def gqa_model(seed: int = 0) -> GLMForCausalLM:
    """A tiny THUDM-layout model in the kernels' blocks: 4 query heads of 32, 2 KV heads, SwiGLU 256, untied."""
    config = THUDM_LAYOUT.config(thudm_config(hidden_size=128, kv_channels=32, ffn_hidden_size=256,
                                              padded_vocab_size=256, seq_length=256))
    torch.manual_seed(seed)
    model = GLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0).add_(torch.randn_like(p) * 0.05)
            else:
                p.normal_(0.0, 0.08 if p.dim() > 1 and "embedding" not in name else 0.5)
    assert model.config.multi_query_group_num == 2 and not model.config.tie_word_embeddings
    return model.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def greedy(model, n=12):
    return model.generate(IDS, max_new_tokens=n, eos_token_ids=())[0, IDS.shape[1]:].tolist()


def dequantized_reference(model: GLMForCausalLM, quantized: GLMForCausalLM) -> GLMForCausalLM:
    """`model` with each block linear's weight replaced by the quantized layer's rounded float weight."""
    reference = copy.deepcopy(model)
    for (_, _, float_layer), (_, _, q_layer) in zip(block_linears(reference), block_linears(quantized), strict=True):
        float_layer.weight.data = q_layer.dequantized_weight().float()
    return reference


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 128)])
@pytest.mark.parametrize("path", PATHS)
def test_gqa_model_quantized_answers_as_its_rounded_float_weights(bits, group, path, request):
    take_path(path, request)
    model = gqa_model()
    quantized = quantize_model(copy.deepcopy(model), bits, group)
    linears = [m for _, _, m in block_linears(quantized)]
    assert len(linears) == 4 * model.config.num_layers and all(isinstance(m, QuantizedLinear) for m in linears)
    assert quantized.transformer.layers[0].attention.query_key_value.out_features == 128 + 2 * 2 * 32  # Q | K | V
    reference = dequantized_reference(model, quantized)
    expected = logits(reference)
    tolerance = 0.03 * float(expected.abs().max())
    answer = greedy(quantized)
    if path == "pytorch":  # float activations: the rounded weights' numbers exactly, and their greedy answer
        assert torch.allclose(logits(quantized), expected, atol=1e-4, rtol=1e-4)
        assert answer == greedy(reference)
    else:  # the native kernels round activations to int8 per 64 columns: close logits
        assert (logits(quantized) - expected).abs().max() <= tolerance
    # every greedy token is the rounded-weight model's choice, or within the tolerance of it (a near tie)
    sequence = torch.tensor([IDS[0].tolist() + answer])
    steps = logits(reference, sequence)[0, IDS.shape[1] - 1:-1]
    chosen = steps.gather(-1, torch.tensor(answer)[:, None])[:, 0]
    assert (chosen >= steps.max(-1).values - tolerance).all()
    assert sum(a == b for a, b in zip(answer, greedy(reference), strict=True)) >= 1
    if bits == 8 and path == "pytorch":  # and INT8 keeps the full-precision greedy answer
        assert answer == greedy(model)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_embeddings_quantizes_the_untied_output_layer_on_its_own(tmp_path, bits):
    model = gqa_model()
    quantized = quantize_embeddings(quantize_model(copy.deepcopy(model), 8), bits)
    table, head = quantized.transformer.word_embeddings, quantized.lm_head
    assert isinstance(table, QuantizedEmbedding) and isinstance(head, QuantizedLinear)
    assert head.weight is not table.weight  # untied: its own rows, quantized from output_layer, not the embedding
    assert torch.allclose(head.dequantized_weight(), model.lm_head.weight, atol=float(head.weight_scale.max()))
    full = logits(model)
    assert (logits(quantized) - full).abs().max() < (0.05 if bits == 8 else 0.3) * full.abs().max()
    quantized.save_pretrained(tmp_path / "q", dtype="float16")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    for name in ("transformer.embedding.word_embeddings", "transformer.output_layer"):  # THUDM names
        assert stored[f"{name}.weight"].dtype == torch.int8 and f"{name}.weight_scale" in stored, name
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_embedding_bit"] == bits
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "q", progress=False, dtype="float32")
    assert isinstance(reloaded.lm_head, QuantizedLinear) and reloaded.lm_head.weight is not \
        reloaded.transformer.word_embeddings.weight
    on_load_dir = tmp_path / "fp"
    model.save_pretrained(on_load_dir, dtype="float32")
    on_load = GLMForCausalLM.from_pretrained(on_load_dir, progress=False, quantize=8,
                                             quantize_embeddings=True if bits == 8 else bits)
    assert torch.equal(logits(on_load), logits(quantize_embeddings(quantize_model(copy.deepcopy(model), 8), bits)))


def test_a_quantized_new_family_model_saves_in_the_official_int4_layout(tmp_path):
    model = gqa_model()
    quantized = quantize_model(copy.deepcopy(model), 4, group_size=0)  # one scale per row: THUDM's layout
    quantized.save_pretrained(tmp_path / "int4", dtype="float16")
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization_bit"] == 4 and config["model_type"] == "chatglm"
    assert config.get("quantization_group_size", 0) == 0
    stored = load_file(tmp_path / "int4" / "model.safetensors")
    for i in range(model.config.num_layers):
        for name in BLOCK_LINEARS:
            key = f"transformer.encoder.layers.{i}.{name}"
            weight, scale = stored[f"{key}.weight"], stored[f"{key}.weight_scale"]
            assert weight.dtype == torch.int8 and scale.dtype == torch.float16 and scale.dim() == 1
            assert weight.shape[0] == scale.shape[0] and weight.shape[1] * 2 in (128, 256), key
    assert stored["transformer.output_layer.weight"].dtype == torch.float16  # not quantized (spec 5.3)
    assert stored["transformer.encoder.layers.0.self_attention.query_key_value.bias"].dtype == torch.float16
    # the packed bytes are the spec's: high nibble = even column of round(w / (absmax / 7))
    w = model.transformer.layers[0].mlp.dense_h_to_4h.weight.data
    q, _ = spec_quantize(w, 4)
    assert torch.equal(stored["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"], spec_pack_int4(q))
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "int4", progress=False, dtype="float32")
    assert reloaded.config.quantization_bit == 4
    assert isinstance(reloaded.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    reloaded.save_pretrained(tmp_path / "again", dtype="float16")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


@pytest.mark.parametrize("path", PATHS)
def test_a_hand_written_chatglm2_int4_directory_loads_and_runs(tmp_path, path, request):
    """THUDM/chatglm2-6b-int4 by hand from spec 5.3: the four block linears int8 (two values per byte, high
    nibble = even column) with an fp16 `weight_scale` [out] beside each, everything else fp16,
    quantization_bit 4 in config.json."""
    take_path(path, request)
    state = {k: v.half() for k, v in thudm_state().items()}
    reference_state = dict(state)
    for name in list(state):
        if name.endswith(tuple(f"{linear}.weight" for linear in BLOCK_LINEARS)):
            q, scales = spec_quantize(state[name].float(), 4)
            state[name] = spec_pack_int4(q)
            state[name.replace(".weight", ".weight_scale")] = scales.squeeze(1).half()
            reference_state[name] = q.float() * scales.half().float()  # exact in fp32
    write_checkpoint(tmp_path / "int4", {}, thudm_config(quantization_bit=4, torch_dtype="float16"))
    (tmp_path / "int4" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "int4" / "pytorch_model.bin")  # int8 stays int8 (write_checkpoint casts)
    write_checkpoint(tmp_path / "ref", reference_state, thudm_config(torch_dtype="float16"), dtype=torch.float32)
    loaded = GLMForCausalLM.from_pretrained(tmp_path / "int4", progress=False, dtype="float32")
    assert loaded.config.quantization_bit == 4
    layer = loaded.transformer.layers[0].attention.query_key_value
    assert isinstance(layer, QuantizedLinear) and layer.bits == 4 and layer.group_size == 0
    reference = GLMForCausalLM.from_pretrained(tmp_path / "ref", progress=False, dtype="float32")
    ids = torch.tensor([[5, 17, 42, 99, 7, 64, 3]])
    expected = logits(reference, ids)
    if path == "pytorch":
        assert torch.allclose(logits(loaded, ids), expected, atol=1e-4, rtol=1e-4)
    else:
        assert (logits(loaded, ids) - expected).abs().max() <= 0.03 * expected.abs().max()
    assert loaded.generate(ids, max_new_tokens=8)[0].tolist() == reference.generate(ids, max_new_tokens=8)[0].tolist()
