"""bench/peer_files.py: the peers' random model files, read back as the peers read them (no peer installed).

Q4_0 blocks go through gguf's own dequantizer (ggml's layout, from ggml's authors); the GGUF file through gguf's
reader, against the names and shapes llama.cpp's `chatglm` architecture loads; chatglm.cpp's file through a
reader written here from its loader (`ModelLoader::read_state_dict`: name, dims reversed into ggml's ne, type,
data at the next 16-byte boundary)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from glmkit.perf.speed import SHAPES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import peer_files  # noqa: E402


def test_q4_0_blocks_dequantize_to_the_nibbles_times_their_scale():
    rng = np.random.default_rng(1)
    nibbles = rng.integers(0, 16, (3, 64), dtype=np.uint8)
    scales = rng.uniform(0.01, 1.0, (3, 2)).astype(np.float16)
    blocks = peer_files.pack_q4_0(nibbles, scales)
    assert blocks.shape == (3, 2 * 18)
    expected = (nibbles.astype(np.float32) - 8) * np.repeat(scales.astype(np.float32), 32, axis=1)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0), expected)


def test_random_q4_0_has_the_spread_asked_for_in_slices_of_rows():
    blocks = peer_files.random_q4_0((300, 256), std=0.05, rng=np.random.default_rng(0), chunk_rows=128)
    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert values.shape == (300, 256)
    assert values.std() == pytest.approx(0.05, rel=0.02)
    assert len(np.unique(values[:, :32])) == 16  # every nibble occurs, the last slice of rows too
    assert len(np.unique(values[-20:])) == 16


def test_the_gguf_file_has_what_llama_cpp_chatglm_loads(tmp_path):
    config = SHAPES["tiny-gqa"]()
    info = peer_files.write_gguf(tmp_path / "m.gguf", config, "tiny")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "chatglm" and field("tokenizer.ggml.model") == "llama"
    assert (field("chatglm.block_count"), field("chatglm.embedding_length")) == (2, 256)
    assert (field("chatglm.attention.head_count"), field("chatglm.attention.head_count_kv")) == (4, 2)
    assert field("chatglm.feed_forward_length") == 512 and field("chatglm.rope.dimension_count") == 32  # half of 64
    assert len(field("tokenizer.ggml.tokens")) == 4096 == len(field("tokenizer.ggml.token_type"))
    assert field("tokenizer.ggml.tokens")[3 + 10] == "<0x0A>"  # the newline piece llama.cpp looks for
    tensors = {t.name: t for t in reader.tensors}
    # ggml order (ne0 first): token_embd {n_embd, n_vocab}, attn_qkv {n_embd, q + k + v}, ffn_up {n_embd, 2 * n_ff}
    expected = {"token_embd.weight": [256, 4096], "output.weight": [256, 4096], "output_norm.weight": [256],
                "blk.1.attn_norm.weight": [256], "blk.1.attn_qkv.weight": [256, 256 + 2 * 2 * 64],
                "blk.1.attn_qkv.bias": [512], "blk.1.attn_output.weight": [256, 256], "blk.1.ffn_norm.weight": [256],
                "blk.1.ffn_up.weight": [256, 1024], "blk.1.ffn_down.weight": [512, 256]}
    assert {name: [int(n) for n in tensors[name].shape] for name in expected} == expected
    assert len(tensors) == 3 + 2 * 7
    assert tensors["blk.1.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.1.attn_qkv.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert info["decode_weight_bytes"] == sum(int(t.n_bytes) for t in reader.tensors) - tensors["token_embd.weight"].n_bytes


def read_chatglm_cpp(path: Path) -> tuple[tuple, bytes, dict]:
    """The config record, tokenizer bytes and {name: (ne, type, data)} of a chatglm.cpp model file."""
    data = path.read_bytes()
    assert data[:4] == b"ggml"
    record = struct.unpack_from("iiiiiiiiififiii", data, 4)
    offset = 4 + struct.calcsize("iiiiiiiiififiii")
    (size,) = struct.unpack_from("i", data, offset)
    tokenizer, offset, tensors = data[offset + 4:offset + 4 + size], offset + 4 + size, {}
    while offset < len(data):
        (name_len,) = struct.unpack_from("i", data, offset)
        name = data[offset + 4:offset + 4 + name_len].decode()
        offset += 4 + name_len
        (ndim,) = struct.unpack_from("i", data, offset)
        *shape, dtype = struct.unpack_from(f"{ndim + 1}i", data, offset + 4)
        offset = (offset + 4 * (ndim + 2) + 15) // 16 * 16
        ne = shape[::-1]
        nbytes = int(np.prod(ne)) * 4 if dtype == 0 else int(np.prod(ne)) // 32 * 18
        tensors[name] = (ne, dtype, data[offset:offset + nbytes])
        offset += nbytes
    return record, tokenizer, tensors


def test_the_chatglm_cpp_file_reads_back_as_its_loader_reads_it(tmp_path):
    config = SHAPES["tiny-gqa"]()
    info = peer_files.write_chatglm_cpp(tmp_path / "m.bin", config, "glm4", peer_files.glm4_vocab())
    record, tokenizer, tensors = read_chatglm_cpp(tmp_path / "m.bin")
    model_type, version, dtype, vocab, hidden, heads, kv_heads, layers, ffn, eps, virtual, theta, *_ = record
    assert (model_type, version, dtype) == (4, 2, 2)  # CHATGLM4, config record v2, Q4_0
    assert (vocab, hidden, heads, kv_heads, layers, ffn, virtual, theta) == (4096, 256, 4, 2, 2, 512, 0, 10000.0)
    assert eps == pytest.approx(1e-5)
    assert tokenizer.splitlines()[10] == b"Cg== 10"  # base64 of b"\n", rank 10
    assert len(tensors) == 3 + 2 * 7
    ne, kind, blocks = tensors["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    assert (ne, kind) == ([256, 1024], 2)
    values = gguf.quants.dequantize(np.frombuffer(blocks, np.uint8).reshape(1024, -1), gguf.GGMLQuantizationType.Q4_0)
    assert values.std() == pytest.approx(1 / 256 ** 0.5, rel=0.05)
    ne, kind, ones = tensors["transformer.encoder.final_layernorm.weight"]
    assert (ne, kind) == ([256], 0) and np.frombuffer(ones, np.float32).tolist() == [1.0] * 256
    assert info["file_bytes"] == (tmp_path / "m.bin").stat().st_size
