"""Weight-only INT8/INT4: kernels against a dequantized reference, the official packed layout (packed
here by hand from the spec), save/load round trips, quantize-while-loading, and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from glmkit import GLMForCausalLM
from glmkit.checkpoints.hf import CheckpointError
from glmkit.cli import main
from glmkit.quant import kernels
from glmkit.quant.quantize import QuantizedLinear, quantize_model, use_kernels

from tiny import prompt, random_model, tiny_config, write_official_bin

IDS = torch.tensor([prompt(5, 17, 42, 99, 7)])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def linear(out_features=64, in_features=256, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    layer.weight.data.normal_(0, 0.5)
    return layer


def spec_quantize(weight: torch.Tensor, bits: int, group: int = 0):
    """The spec's symmetric rule, written out: scale = absmax / (2^(bits-1) - 1) per row (or group)."""
    rows, cols = weight.shape
    group = group or cols
    q = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, cols // group)
    for r in range(rows):
        for g in range(cols // group):
            block = weight[r, g * group:(g + 1) * group].double()
            scale = block.abs().max() / (2 ** (bits - 1) - 1)
            scales[r, g] = scale
            q[r, g * group:(g + 1) * group] = torch.round(block / scale).to(torch.int8)
    return q, scales


def spec_pack_int4(q: torch.Tensor) -> torch.Tensor:
    """byte = (w[2j] << 4) | (w[2j+1] & 0xF), element by element, as the official quantization.py describes."""
    rows, cols = q.shape
    out = torch.empty(rows, cols // 2, dtype=torch.int8)
    for r in range(rows):
        for j in range(cols // 2):
            byte = ((int(q[r, 2 * j]) << 4) | (int(q[r, 2 * j + 1]) & 0xF)) & 0xFF
            out[r, j] = byte - 256 if byte > 127 else byte
    return out


def spec_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the native kernels multiply by: x rounded to int8 per block of 64 columns, scale absmax / 127
    (q = round(x * (1 / scale)), ties to even), returned dequantized."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 64)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


needs_native = pytest.mark.skipif(not kernels.available(), reason="glmkit's native kernels need gcc and AVX2/FMA")
needs_avx512 = pytest.mark.skipif("avx512" not in kernels.cpu_isas(), reason="this CPU has no AVX-512 VNNI")
# Each matmul path a quantized layer can take: PyTorch's ops, and each of the native kernel sets.
NATIVE = [pytest.param("avx2", marks=needs_native), pytest.param("avx512", marks=needs_avx512)]
PATHS = [pytest.param("pytorch"), *NATIVE]


def take_path(path: str, request: pytest.FixtureRequest) -> None:
    if path == "pytorch":
        request.getfixturevalue("pytorch_ops")
    else:
        request.getfixturevalue("monkeypatch").setenv("GLMKIT_KERNEL_ISA", path)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_quantized_matmul_matches_the_dequantized_reference(bits, group, dtype, path, request):
    take_path(path, request)
    layer = linear()
    quantized = QuantizedLinear.from_linear(layer, bits, group).to(dtype)
    q, scales = spec_quantize(layer.weight.data, bits, group)
    reference_weight = (q.double().reshape(64, scales.shape[1], -1) * scales.double().unsqueeze(-1)).reshape(64, 256)
    if dtype == torch.bfloat16:  # the layer holds its scales in bf16
        reference_weight = (q.double().reshape(64, scales.shape[1], -1)
                            * scales.bfloat16().double().unsqueeze(-1)).reshape(64, 256)
    x = torch.randn(2, 7, 256).to(dtype)  # 14 rows: the kernel path in fp32 too (above 16, fp32 dequantizes)
    multiplied = x if path == "pytorch" else spec_quantize_activations(x)
    expected = F.linear(multiplied.double(), reference_weight, layer.bias.data.double())
    out = quantized(x).double()
    tolerance = 1e-5 if dtype == torch.float32 else 0.02
    assert (out - expected).abs().max() <= tolerance * expected.abs().max()
    assert quantized._kernel[0] == (("int8" if bits == 8 else "int4") if path == "pytorch" else "native")


@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("bits,group,rows,width", [(4, 128, 1, 512), (4, 0, 37, 512), (8, 0, 19, 512),
                                                   (4, 256, 6, 512), (8, 0, 4, 512), (8, 0, 5, 192), (4, 0, 3, 192)])
def test_native_kernels_take_odd_row_counts_and_stay_within_activation_rounding(bits, group, rows, width, path,
                                                                              request):
    """Output rows not in fours (the kernels' tile), activation rows not in fours (the AVX-512 tile)
    and many of them (chunks of 16), and a width that is 64s but not 128s (AVX-512 INT4 falls back to
    AVX2 there); against the float product, the error is what int8 activations cost: under 1% here."""
    take_path(path, request)
    request.getfixturevalue("monkeypatch").setattr(kernels, "DENSE_MIN_ROWS", 10**9)  # the integer kernels only
    layer = linear(out_features=4 * 9 + 3, in_features=width, seed=3)
    quantized = QuantizedLinear.from_linear(layer, bits, group)
    x = torch.randn(rows, width)
    out = quantized(x)
    exact = F.linear(x, quantized.dequantized_weight(), layer.bias.data)
    emulated = F.linear(spec_quantize_activations(x), quantized.dequantized_weight(), layer.bias.data)
    assert (out - emulated).abs().max() <= 1e-5 * exact.abs().max()
    assert 0 < (out - exact).abs().max() <= 0.01 * exact.abs().max()


@needs_native
@pytest.mark.parametrize("path", NATIVE)
@pytest.mark.parametrize("bits,group", [(4, 0), (4, 64), (8, 0)])
def test_bf16_dequantization_for_prompts_is_exact(bits, group, path, request):
    """The prompt path's weights: each is q * scale rounded once to bf16, row ranges included."""
    take_path(path, request)
    quantized = QuantizedLinear.from_linear(linear(out_features=70, in_features=256, seed=5), bits, group)
    expected = quantized.dequantized_weight().bfloat16()
    assert torch.equal(kernels.dequantize_bf16(quantized.weight, quantized.weight_scale, bits, group or 256, 0, 70),
                       expected)
    assert torch.equal(kernels.dequantize_bf16(quantized.weight, quantized.weight_scale, bits, group or 256, 33, 51),
                       expected[33:51])


@needs_native
@pytest.mark.parametrize("bits,group", [(4, 128), (8, 0)])
def test_long_prompts_multiply_in_bf16_where_that_is_fast(bits, group, monkeypatch):
    """From DENSE_MIN_ROWS rows on (where the CPU has AMX) the layer multiplies bf16 weights in
    chunks; forced on here with a chunk smaller than the layer, so the chunk edges are covered."""
    monkeypatch.setattr(kernels, "dense_prompts", lambda: True)
    monkeypatch.setattr(kernels, "DEQUANTIZE_CHUNK_BYTES", 2 * 512 * 16)  # 16 rows per chunk
    chunks = []
    dequantize_bf16 = kernels.dequantize_bf16
    monkeypatch.setattr(kernels, "dequantize_bf16", lambda *a, **k: chunks.append(a[4:6]) or dequantize_bf16(*a, **k))
    layer = linear(out_features=4 * 9 + 3, in_features=512, seed=3)
    quantized = QuantizedLinear.from_linear(layer, bits, group)
    x = torch.randn(kernels.DENSE_MIN_ROWS + 2, 512)
    weight = quantized.dequantized_weight()
    expected = F.linear(x.bfloat16().double(), weight.bfloat16().double(), layer.bias.data.double())
    out = quantized(x).double()
    assert chunks == [(0, 16), (16, 32), (32, 39)]
    assert (out - expected).abs().max() <= 0.01 * expected.abs().max()  # bf16 output rounding, no more
    short = quantized(x[:4])  # fewer rows: the integer kernels (int8 activations), close to the same numbers
    assert len(chunks) == 3 and (short.double() - expected[:4]).abs().max() <= 0.02 * expected.abs().max()


def test_int4_packing_follows_the_official_byte_layout():
    layer = linear(out_features=8, in_features=32)
    quantized = QuantizedLinear.from_linear(layer, bits=4, group_size=0)
    q, scales = spec_quantize(layer.weight.data, 4)
    assert torch.equal(quantized.weight, spec_pack_int4(q))
    assert torch.allclose(quantized.weight_scale, scales.squeeze(1))


def test_quantization_error_is_within_half_a_step():
    layer = linear()
    for bits, group in [(8, 0), (4, 128)]:
        quantized = QuantizedLinear.from_linear(layer, bits, group)
        step = quantized.weight_scale.reshape(64, -1).repeat_interleave(group or 256, dim=1)
        assert ((quantized.dequantized_weight() - layer.weight.data).abs() <= step / 2 + 1e-6).all()


def write_official_quantized(model, directory, bits):
    """THUDM/chatglm-6b-int4 / -int8, by hand: the four block linears as int8 (INT4 packed two per byte)
    with fp16 per-row weight_scale, everything else fp16, and quantization_bit in config.json."""
    write_official_bin(model, directory, shards=1)
    state = torch.load(directory / "pytorch_model-00001-of-00001.bin", weights_only=True)
    dequantized = {}
    for name in list(state):
        if ".layers." in name and name.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                                 "dense_4h_to_h.weight")):
            q, scales = spec_quantize(state[name].float(), bits)
            state[name] = spec_pack_int4(q) if bits == 4 else q
            state[name.replace(".weight", ".weight_scale")] = scales.squeeze(1).half()
            dequantized[name] = q.float() * scales.half().float()
    torch.save(state, directory / "pytorch_model-00001-of-00001.bin")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_bit"] = bits
    (directory / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("path", PATHS)
def test_the_official_quantized_layout_loads_and_runs(tmp_path, bits, path, request):
    take_path(path, request)
    model = random_model()
    dequantized = write_official_quantized(model, tmp_path, bits)
    loaded = GLMForCausalLM.from_pretrained(tmp_path, progress=False)
    assert loaded.config.quantization_bit == bits
    assert isinstance(loaded.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    reference = GLMForCausalLM(model.config).eval()
    state = {k: v.half().float() for k, v in model.state_dict().items()}
    reference.load_state_dict({**state, **dequantized})
    if path == "pytorch":  # float activations: the dequantized model's numbers
        assert torch.allclose(logits(loaded), logits(reference), atol=1e-4, rtol=1e-4)
    else:  # int8 activations: close, and the same next tokens
        expected = logits(reference)
        assert (logits(loaded) - expected).abs().max() <= 0.02 * expected.abs().max()
        assert torch.equal(logits(loaded).argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_save_and_reload_round_trip_is_exact(tmp_path, bits):
    model = quantize_model(random_model(tiny_config(hidden_size=128, inner_hidden_size=512)), bits)
    model.save_pretrained(tmp_path / "q", dtype="float32")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    weight = stored["transformer.layers.0.mlp.dense_h_to_4h.weight"]
    assert weight.dtype == torch.int8 and weight.shape == (512, 128 // (2 if bits == 4 else 1))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_bit"] == bits
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "q", progress=False)
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, bits):
    model = random_model(tiny_config(hidden_size=128, inner_hidden_size=512))
    model.save_pretrained(tmp_path, dtype="float32")
    while_loading = GLMForCausalLM.from_pretrained(tmp_path, quantize=bits, progress=False)
    after = quantize_model(GLMForCausalLM.from_pretrained(tmp_path, progress=False), bits)
    assert torch.equal(logits(while_loading), logits(after))
    full = logits(model)
    gap = (logits(while_loading) - full).abs().max() / full.abs().max()
    assert gap < (0.02 if bits == 8 else 0.2)  # near the full-precision logits, INT8 closer than INT4
    assert not any(isinstance(m, torch.nn.Linear) and m is not while_loading.lm_head
                   for m in while_loading.transformer.layers.modules())


def test_loading_a_quantized_checkpoint_at_other_bits_is_refused(tmp_path):
    quantize_model(random_model(), 8).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="already quantized to 8 bits"):
        GLMForCausalLM.from_pretrained(tmp_path, quantize=4, progress=False)


def test_a_config_that_claims_quantization_over_float_weights_is_refused(tmp_path):
    random_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(CheckpointError, match="config.json does not match the weights"):
        GLMForCausalLM.from_pretrained(tmp_path, progress=False)


def test_cli_quantize_writes_a_model_that_loads(tmp_path, capsys):
    model = random_model(tiny_config(hidden_size=128, inner_hidden_size=512))
    model.save_pretrained(tmp_path / "fp", dtype="float32")
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "int4"), "--bits", "4"]) == 0
    assert "4-bit" in capsys.readouterr().out
    fp_size = (tmp_path / "fp" / "model.safetensors").stat().st_size
    assert (tmp_path / "int4" / "model.safetensors").stat().st_size < fp_size / 2
    loaded = GLMForCausalLM.from_pretrained(tmp_path / "int4", progress=False)
    assert loaded.config.quantization_group_size == 128
    expected = quantize_model(GLMForCausalLM.from_pretrained(tmp_path / "fp", progress=False), 4)
    expected = logits(expected)  # scales and biases were stored in fp16, and rounding int8 activations amplifies that
    assert (logits(loaded) - expected).abs().max() <= 0.02 * expected.abs().max()


def test_info_describes_a_quantized_directory(tmp_path, capsys):
    model = random_model(tiny_config(hidden_size=128, inner_hidden_size=512))
    model.save_pretrained(tmp_path / "fp")
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--bits", "4", "--group-size", "0"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "q")]) == 0
    text = capsys.readouterr().out
    assert "INT4 block linears, one scale per row (official layout)" in text
    parameters = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert f"{parameters:,}" in text


def test_quantized_greedy_answers_stay_close_on_the_demo_model():
    import glmkit

    questions = ["What is the capital of France?", "法国的首都是哪里？", "How do you say 'water' in Chinese?",
                 "“朋友”用英语怎么说？", "Who are you?", "你是谁？", "What is the capital of Japan?", "日本的首都是哪里？"]
    full, tokenizer = glmkit.load(progress=False)
    expected = [full.chat(tokenizer, q, do_sample=False, max_new_tokens=40)[0] for q in questions]
    int8, _ = glmkit.load(progress=False, quantize=8)
    int4, _ = glmkit.load(progress=False, quantize=4)
    assert [int8.chat(tokenizer, q, do_sample=False, max_new_tokens=40)[0] for q in questions] == expected
    same4 = sum(int4.chat(tokenizer, q, do_sample=False, max_new_tokens=40)[0] == e
                for q, e in zip(questions, expected, strict=True))
    assert same4 >= 6, f"INT4 kept only {same4} of {len(questions)} greedy answers"


def test_shapes_the_cpu_kernel_cannot_take_fall_back_to_dequantizing():
    layer = linear(out_features=24, in_features=96)  # rows not in 16s, columns not in 128s
    quantized = QuantizedLinear.from_linear(layer, bits=4, group_size=32)
    x = torch.randn(2, 96)
    out = quantized(x)
    assert quantized._kernel[0] == "dequantize"
    assert torch.allclose(out, F.linear(x, quantized.dequantized_weight(), layer.bias.data), atol=1e-5)


EMBEDDING_SHAPES = [(8, 64, 0), (4, 256, 128), (4, 64, 0)]  # bits, hidden, expected scale group (0: per row)


@pytest.mark.parametrize("bits,hidden,group", EMBEDDING_SHAPES)
def test_quantized_embeddings_look_up_and_project_with_the_spec_rows(pytorch_ops, bits, hidden, group):
    """Each token's row is quantized by the spec's rule (INT8: one scale per row; INT4: per 128 columns,
    packed as the official linears); the tied output layer uses the same table, and the logits equal
    hidden @ dequantized_table^T."""
    from glmkit.quant.quantize import quantize_embeddings

    config = tiny_config(hidden_size=hidden, inner_hidden_size=4 * hidden)
    model = random_model(config)
    table = model.transformer.word_embeddings.weight.detach().clone()
    quantize_embeddings(model, bits)
    q, scales = spec_quantize(table, bits, group)
    dequantized = (q.float().reshape(256, scales.shape[1], -1) * scales.unsqueeze(-1)).reshape(256, hidden)
    embedding = model.transformer.word_embeddings
    assert torch.equal(embedding.weight, spec_pack_int4(q) if bits == 4 else q)
    assert torch.allclose(embedding.weight_scale.reshape(256, -1), scales.float())
    assert model.lm_head.weight is embedding.weight  # stored once
    ids = torch.tensor([[3, 17, 255]])
    assert torch.allclose(embedding(ids), dequantized[ids], atol=1e-6)
    hidden_states = torch.randn(2, hidden)
    with torch.no_grad():
        assert torch.allclose(model.lm_head(hidden_states), hidden_states @ dequantized.T, atol=1e-4)
    full = logits(random_model(config))
    gap = (logits(model) - full).abs().max() / full.abs().max()
    assert 0 < gap < (0.05 if bits == 8 else 0.3)  # close, not equal; INT4 further off
    assert model.config.quantization_embedding_bit == bits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embeddings_save_load_and_quantize_on_load(tmp_path, tied, bits):
    from glmkit.quant.quantize import quantize_embeddings

    config = tiny_config(tie_word_embeddings=tied, hidden_size=256, inner_hidden_size=512)
    random_model(config).save_pretrained(tmp_path / "fp", dtype="float32")
    offline = quantize_embeddings(quantize_model(random_model(config), 8), bits)
    on_load = GLMForCausalLM.from_pretrained(tmp_path / "fp", progress=False, quantize=8,
                                             quantize_embeddings=True if bits == 8 else bits)
    assert torch.equal(logits(on_load), logits(offline))
    on_load.save_pretrained(tmp_path / "q", dtype="float32")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["transformer.word_embeddings.weight"].dtype == torch.int8
    assert ("lm_head.weight" in stored) == (not tied) and ("lm_head.weight_scale" in stored) == (not tied)
    assert stored["transformer.word_embeddings.weight"].shape == (256, 256 // (2 if bits == 4 else 1))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_embedding_bit"] == bits
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "q", progress=False)
    assert torch.equal(logits(reloaded), logits(offline))
    if tied:
        assert reloaded.lm_head.weight is reloaded.transformer.word_embeddings.weight
    with pytest.raises(CheckpointError, match=f"stores its embeddings at {bits} bits"):
        GLMForCausalLM.from_pretrained(tmp_path / "q", progress=False, quantize_embeddings=12 - bits)


def test_cli_quantize_embeddings_shrinks_the_table(tmp_path, capsys):
    random_model(tiny_config(vocab_size=2048, hidden_size=128, inner_hidden_size=512)).save_pretrained(
        tmp_path / "fp", dtype="float32")
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--bits", "8", "--embeddings",
                 "--dtype", "float32"]) == 0
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q0"), "--bits", "8", "--dtype", "float32"]) == 0
    with_table, without = (load_file(tmp_path / d / "model.safetensors")["transformer.word_embeddings.weight"]
                           for d in ("q", "q0"))
    assert with_table.element_size() * 4 == without.element_size()
    assert "quantization_embedding_bit" not in json.loads((tmp_path / "q0" / "config.json").read_text())
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q4"), "--bits", "4", "--embedding-bits", "4",
                 "--dtype", "float32"]) == 0
    int4_table = load_file(tmp_path / "q4" / "model.safetensors")["transformer.word_embeddings.weight"]
    assert int4_table.shape == (2048, 64) and int4_table.dtype == torch.int8  # two per byte
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_embedding_bit"] == 4


def test_int8_embeddings_keep_the_demo_model_answers():
    import glmkit

    questions = ["What is the capital of France?", "法国的首都是哪里？", "How do you say 'water' in Chinese?",
                 "“朋友”用英语怎么说？", "Who are you?", "你是谁？"]
    full, tokenizer = glmkit.load(progress=False)
    quantized, _ = glmkit.load(progress=False, quantize=8, quantize_embeddings=True)
    assert isinstance(quantized.transformer.word_embeddings, glmkit.quant.quantize.QuantizedEmbedding)
    assert [quantized.chat(tokenizer, q, do_sample=False, max_new_tokens=40)[0] for q in questions] == \
        [full.chat(tokenizer, q, do_sample=False, max_new_tokens=40)[0] for q in questions]


def test_int8_embeddings_under_tensor_parallelism_are_refused_before_loading(tmp_path):
    from glmkit.checkpoints.hf import load_model
    from glmkit.parallel.tp import TPError

    random_model(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(TPError, match="Quantized embeddings are not sharded"):
        load_model(tmp_path, tp=2, quantize_embeddings=True)


@pytest.mark.parametrize("bits,says", [(8, "INT8 word embedding and output layer, one scale per token"),
                                       (4, "INT4 word embedding and output layer, one scale per 128 columns")])
def test_info_counts_quantized_embedding_rows_once(tmp_path, capsys, bits, says):
    from glmkit.quant.quantize import quantize_embeddings

    model = random_model(tiny_config(hidden_size=128, inner_hidden_size=512))
    parameters = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    quantize_embeddings(quantize_model(model, 4), bits).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"{parameters:,}" in text and says in text


def test_int4_in_the_bf16_kernel_keeps_one_copy_and_saves_the_official_layout(tmp_path, pytorch_ops):
    """After a bf16 forward the stored copy is freed (the kernel's packing serves every row count); saving,
    moving and fp32 forwards bring back exactly the official bytes."""
    model = quantize_model(random_model(tiny_config(hidden_size=128, inner_hidden_size=512)), 4, 64)
    stored = {n: b.clone() for n, b in model.state_dict().items() if b.dtype == torch.int8}
    layer = model.transformer.layers[0].mlp.dense_h_to_4h
    with torch.no_grad():
        before = model.to(torch.bfloat16)(IDS).logits
        again = model(IDS).logits
    assert layer._buffers["weight"] is None  # one copy in memory
    assert torch.equal(before, again)
    assert all(torch.equal(model.state_dict()[n], b) for n, b in stored.items())
    model.save_pretrained(tmp_path, dtype="bfloat16")
    reloaded = GLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, before)
    assert torch.equal(layer.weight, stored["transformer.layers.0.mlp.dense_h_to_4h.weight"])  # asked for: back


def test_the_cpu_kernel_packing_by_row_blocks_equals_packing_whole():
    from glmkit.quant.quantize import cpu_kernel_int4_pack, pack_int4

    torch.manual_seed(0)
    values = torch.randint(-8, 8, (1024 + 48, 256), dtype=torch.int8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu((values.to(torch.int32) + 8).contiguous(), 1)
    assert torch.equal(cpu_kernel_int4_pack(pack_int4(values)), whole)
    assert torch.equal(cpu_kernel_int4_pack(pack_int4(values), rows_per_chunk=64), whole)


@pytest.mark.parametrize("bits", [4, 8])
def test_exact_kernels_reproduce_the_official_quantized_model(tmp_path, bits):
    """--kernels exact: float activations, so the official INT4/INT8 checkpoint answers with its dequantized weights'
    numbers (the promise is 2e-2; float rounding gives far less), whatever native kernels this CPU has."""
    model = random_model()
    dequantized = write_official_quantized(model, tmp_path, bits)
    reference = GLMForCausalLM(model.config).eval()
    reference.load_state_dict({**{k: v.half().float() for k, v in model.state_dict().items()}, **dequantized})
    exact = GLMForCausalLM.from_pretrained(tmp_path, progress=False, kernels="exact")
    assert (logits(exact) - logits(reference)).abs().max() < 1e-4


def test_bench_takes_the_kernels_flag(capsys):
    assert main(["bench", "--shape", "tiny", "--bits", "4", "--kernels", "exact", "--prompt-len", "8",
                 "--new-tokens", "2", "--repeats", "1", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)["results"]
    assert result["kernels"] == "pytorch (float activations)"


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_native_kernels_round_activations_and_exact_ones_do_not(tmp_path, bits):
    model = random_model()
    dequantized = write_official_quantized(model, tmp_path, bits)
    reference = GLMForCausalLM(model.config).eval()
    reference.load_state_dict({**{k: v.half().float() for k, v in model.state_dict().items()}, **dequantized})
    native = GLMForCausalLM.from_pretrained(tmp_path, progress=False)
    expected = logits(reference)
    native_gap = float((logits(native) - expected).abs().max())
    use_kernels(native, "exact")  # switched on a loaded model, after the native packing was made
    assert float((logits(native) - expected).abs().max()) < 1e-4 < native_gap
    use_kernels(native, "native")
    assert float((logits(native) - expected).abs().max()) == pytest.approx(native_gap)


def test_switching_kernels_keeps_an_int4_weight_the_bf16_kernel_freed():
    layer = QuantizedLinear.from_linear(linear(64, 256), bits=4, group_size=128)
    stored = layer.weight.clone()
    model = torch.nn.Sequential(layer)
    use_kernels(model, "exact")
    layer(torch.randn(3, 256).bfloat16())  # PyTorch's bf16 int4 kernel keeps its own packing and frees the stored copy
    assert layer._buffers["weight"] is None
    use_kernels(model, "native")
    use_kernels(model, "exact")
    assert torch.equal(layer.weight, stored)
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-4)
    with pytest.raises(ValueError, match="kernels must be one of native, exact"):
        use_kernels(model, "fast")
