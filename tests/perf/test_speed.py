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
