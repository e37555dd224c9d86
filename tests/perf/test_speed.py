"""`glmkit bench` on the tiny shape: a random model built quantized from the start, and JSON out."""

import json

import torch

from glmkit.cli import main
from glmkit.perf.speed import SHAPES, random_model
from glmkit.quant.quantize import QuantizedLinear


def test_a_quantized_random_model_never_holds_full_precision_block_weights():
    model = random_model(SHAPES["tiny"](), torch.bfloat16, bits=4)
    block = model.transformer.layers[0]
    for layer in (block.attention.query_key_value, block.attention.dense, block.mlp.dense_h_to_4h):
        assert isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.int8
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 4001, 4004]])).logits).all()


def test_bench_reports_json(capsys):
    assert main(["bench", "--shape", "tiny", "--bits", "8", "--prompt-len", "16", "--new-tokens", "4",
                 "--repeats", "1", "--load", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["results"][0]
    assert report["machine"]["cores"] >= 1 and result["bits"] == 8
    assert result["decode_ms_per_token"] > 0 and result["prefill_tokens_per_s"]["16"] > 0
    assert result["load_s"] > 0 and result["peak_rss_gib"] > 0


def test_bench_builds_an_int4_table_when_asked(capsys):
    from glmkit.quant.quantize import QuantizedEmbedding

    model = random_model(SHAPES["tiny"](), torch.float32, bits=4, embeddings=4)
    table = model.transformer.word_embeddings
    assert isinstance(table, QuantizedEmbedding) and table.bits == 4
    assert table.weight.shape == (table.num_embeddings, table.embedding_dim // 2)
    assert model.lm_head.weight is table.weight and model.config.quantization_embedding_bit == 4
    assert main(["bench", "--shape", "tiny", "--bits", "4", "--embedding-bits", "4", "--prompt-len", "8",
                 "--new-tokens", "2", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"][0]["embedding_bits"] == 4 and report["machine"]["native_kernels"] in (None, "avx2", "avx512")


def test_the_new_shapes_are_the_released_architectures():
    from glmkit.perf.speed import kv_cache_bytes_per_token

    chatglm3, glm4 = SHAPES["chatglm3-6b"](), SHAPES["glm-4-9b"]()
    for config, layers, vocab in [(chatglm3, 28, 65024), (glm4, 40, 151552)]:
        assert (config.num_layers, config.vocab_size, config.kv_heads, config.head_dim) == (layers, vocab, 2, 128)
        assert (config.hidden_size, config.inner_hidden_size, config.num_attention_heads) == (4096, 13696, 32)
        assert config.causal and not config.tie_word_embeddings
    assert glm4.rotary_base == 10000.0 * 500
    # the KV cache holds the 2 KV heads only: 2 (k, v) * layers * 2 heads * 128 values per token
    model = random_model(SHAPES["tiny-gqa"](), torch.bfloat16, bits=4)
    config = model.config
    assert kv_cache_bytes_per_token(model) == 2 * config.num_layers * 2 * config.head_dim * 2  # bf16
    assert isinstance(model.transformer.layers[0].attention.query_key_value, QuantizedLinear)
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight  # untied, as released


def test_bench_runs_the_new_architecture_at_tiny_size(capsys):
    assert main(["bench", "--shape", "tiny-gqa", "--bits", "4", "--dtype", "bfloat16", "--prompt-len", "16",
                 "--new-tokens", "3", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["shape"] == "tiny-gqa" and result["kv_heads"] == 2
    assert result["kv_cache_values_per_token"] == 2 * 2 * 2 * 64 and result["kv_cache_bytes_per_token"] == 1024
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"]["16"] > 0
    assert main(["bench", "--shape", "tiny-gqa", "--bits", "8", "--quantize-embeddings", "--prompt-len", "8",
                 "--new-tokens", "2", "--repeats", "1"]) == 0
    assert "KV cache 2048 B/token" in capsys.readouterr().out  # fp32 activations: 4 bytes a value


def test_decode_weight_bytes_counts_what_a_token_reads():
    from glmkit.perf.speed import decode_weight_bytes

    # tiny-gqa: hidden 256, 2 layers, 4 heads of 64 and 2 KV heads, SwiGLU 512, vocab 4096, untied output
    model = random_model(SHAPES["tiny-gqa"](), torch.bfloat16, bits=4, embeddings=4)

    def int4(out_features, in_features):  # two values a byte, a bf16 scale per 128 columns
        return out_features * in_features // 2 + out_features * (in_features // 128) * 2

    block = (int4(512, 256) + 512 * 2  # query_key_value and its bias
             + int4(256, 256) + int4(1024, 256) + int4(256, 512) + 2 * 256 * 2)  # dense, MLP, two norms
    # the embedding table is left out (a token reads one row), the INT4 output layer is read whole
    assert decode_weight_bytes(model) == 2 * block + 256 * 2 + int4(4096, 256)
