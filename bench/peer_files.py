"""Random-weight model files of a real shape in the peers' own formats, written directly in ggml's Q4_0.

`bench/peers.py` times glmkit against chatglm.cpp and llama.cpp on the same shapes, and neither peer can take
glmkit's random model: each reads its own file. Both files are written here tensor by tensor, straight in Q4_0
blocks of random nibbles, so a 6B or 9B model never exists in fp16 (it would not fit beside the engines).

Both peers get the same tensors, named as each expects: the THUDM names chatglm.cpp's converter writes
(`chatglm_cpp/convert.py`, `ChatGLM2Converter.dump_model`) and the GGUF names of llama.cpp's `chatglm`
architecture (`src/models/chatglm.cpp`: token_embd, blk.N.attn_qkv with bias, attn_output, ffn_up holding
gate and up, ffn_down, the norms, output). The matrices, embedding table and output layer are Q4_0, as both
converters write them for q4_0; norms and the QKV bias are f32.

Only numpy and gguf are needed here (no torch), so the writer runs beside the engines in little memory.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

if TYPE_CHECKING:
    from glmkit.models.config import GLMConfig

QK4_0 = 32  # values per ggml block_q4_0
Q4_0_BLOCK_BYTES = 2 + QK4_0 // 2  # an fp16 scale d, then 16 bytes of nibbles
GGML_Q4_0, GGML_F32 = 2, 0  # ggml_type values, the same in both files
Q4_VALUE_STD = float(np.arange(-8, 8).std())  # the spread of q - 8 for uniform nibbles
CHATGLM_CPP_ALIGN = 16  # chatglm.cpp aligns every tensor's data to 16 bytes of the file
CHATGLM_CPP_MODEL_TYPES = {"chatglm3": 3, "glm4": 4}  # chatglm.cpp's ModelType


@dataclass(frozen=True)
class Tensor:
    thudm: str  # the name in chatglm.cpp's file (THUDM's)
    gguf: str  # the name in llama.cpp's GGUF
    shape: tuple[int, ...]  # PyTorch order: [out, in] for a matrix
    fill: str  # "q4_0" (random blocks), "ones" (norm weights) or "zeros" (the QKV bias)

    @property
    def nbytes(self) -> int:
        if self.fill == "q4_0":
            rows, cols = self.shape
            return rows * cols // QK4_0 * Q4_0_BLOCK_BYTES
        return int(np.prod(self.shape)) * 4

    @property
    def ggml_type(self) -> int:
        return GGML_Q4_0 if self.fill == "q4_0" else GGML_F32


def thudm_tensors(config: GLMConfig) -> list[Tensor]:
    """Every tensor of a ChatGLM2/ChatGLM3/GLM-4 model of `config`'s shape, in the order chatglm.cpp writes them."""
    h, vocab, ffn = config.hidden_size, config.vocab_size, config.inner_hidden_size
    q_width = config.num_attention_heads * config.head_dim
    qkv = q_width + 2 * config.kv_heads * config.head_dim
    tensors = [Tensor("transformer.embedding.word_embeddings.weight", "token_embd.weight", (vocab, h), "q4_0")]
    for i in range(config.num_layers):
        thudm, gguf = f"transformer.encoder.layers.{i}.", f"blk.{i}."
        tensors += [
            Tensor(thudm + "input_layernorm.weight", gguf + "attn_norm.weight", (h,), "ones"),
            Tensor(thudm + "self_attention.query_key_value.weight", gguf + "attn_qkv.weight", (qkv, h), "q4_0"),
            Tensor(thudm + "self_attention.query_key_value.bias", gguf + "attn_qkv.bias", (qkv,), "zeros"),
            Tensor(thudm + "self_attention.dense.weight", gguf + "attn_output.weight", (h, q_width), "q4_0"),
            Tensor(thudm + "post_attention_layernorm.weight", gguf + "ffn_norm.weight", (h,), "ones"),
            # gate and up in one matrix, gate first: THUDM's dense_h_to_4h, llama.cpp's fused ffn_up
            Tensor(thudm + "mlp.dense_h_to_4h.weight", gguf + "ffn_up.weight", (2 * ffn, h), "q4_0"),
            Tensor(thudm + "mlp.dense_4h_to_h.weight", gguf + "ffn_down.weight", (h, ffn), "q4_0"),
        ]
    tensors += [Tensor("transformer.encoder.final_layernorm.weight", "output_norm.weight", (h,), "ones"),
                Tensor("transformer.output_layer.weight", "output.weight", (vocab, h), "q4_0")]
    return tensors


def decode_bytes(tensors: list[Tensor]) -> int:
    """Bytes one decoded token reads: every tensor but the input embedding table (one row of it)."""
    return sum(t.nbytes for t in tensors if t.gguf != "token_embd.weight")


def pack_q4_0(nibbles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml's block_q4_0 rows: value j of a block is (nibble - 8) * d. Per 32 columns: d as fp16, then 16 bytes
    where byte j holds value j in its low nibble and value j + 16 in its high one.

    nibbles: [rows, cols] of 0..15; scales: [rows, cols // 32]. Returns uint8 [rows, cols // 32 * 18]."""
    rows, cols = nibbles.shape
    q = nibbles.astype(np.uint8).reshape(rows, cols // QK4_0, QK4_0)
    blocks = np.empty((rows, cols // QK4_0, Q4_0_BLOCK_BYTES), np.uint8)
    blocks[..., :2] = scales.astype("<f2").reshape(rows, -1, 1).view(np.uint8)
    blocks[..., 2:] = q[..., :16] | (q[..., 16:] << 4)
    return blocks.reshape(rows, -1)


def random_q4_0(shape: tuple[int, ...], std: float, rng: np.random.Generator, chunk_rows: int = 4096) -> np.ndarray:
    """Random Q4_0 blocks whose values have standard deviation `std`, packed a slice of rows at a time so the
    unpacked nibbles of a whole table never exist at once."""
    rows, cols = shape
    if cols % QK4_0:
        raise ValueError(f"Q4_0 needs rows of a multiple of {QK4_0} values, not {cols}")
    out = np.empty((rows, cols // QK4_0 * Q4_0_BLOCK_BYTES), np.uint8)
    for start in range(0, rows, chunk_rows):
        n = min(chunk_rows, rows - start)
        scales = np.full((n, cols // QK4_0), std / Q4_VALUE_STD, np.float16)
        out[start:start + n] = pack_q4_0(rng.integers(0, 16, (n, cols), dtype=np.uint8), scales)
    return out


def tensor_data(tensor: Tensor, std: float, rng: np.random.Generator) -> np.ndarray:
    if tensor.fill == "q4_0":
        return random_q4_0(tensor.shape, std, rng)
    return (np.ones if tensor.fill == "ones" else np.zeros)(tensor.shape, np.float32)


def weights(tensors: list[Tensor], config: GLMConfig, seed: int = 0) -> Iterator[tuple[Tensor, np.ndarray]]:
    """Each tensor with its data, made when asked for: one in memory at a time. The spread is glmkit bench's
    (1 / sqrt(hidden)), so activations stay finite through every layer (chatglm.cpp checks the logits)."""
    rng = np.random.default_rng(seed)
    std = 1.0 / config.hidden_size ** 0.5
    for tensor in tensors:
        yield tensor, tensor_data(tensor, std, rng)


def first(ids: int | list[int]) -> int:
    return ids[0] if isinstance(ids, list) else ids


# --- llama.cpp: GGUF ---------------------------------------------------------------------------------------------

def spm_vocab(size: int) -> tuple[list[str], list[int]]:
    """A SentencePiece-style vocabulary of `size` pieces as llama.cpp's "llama" tokenizer reads it: <unk> <s> </s>,
    the 256 byte pieces (it looks up the newline among them), then placeholders. Token ids are fed to the engine
    directly, so what the pieces spell does not matter, only that there is one per row of the table."""
    unknown, normal, control, byte = 2, 1, 3, 6  # llama_token_type
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [unknown, control, control] + [byte] * 256
    pieces += [f"\u2581p{i}" for i in range(size - len(pieces))]
    return pieces, types + [normal] * (size - len(types))


def write_gguf(path: Path, config: GLMConfig, name: str) -> dict:
    """A GGUF file of architecture `chatglm` (the metadata llama.cpp's converter writes for ChatGLM3 and GLM-4,
    `conversion/chatglm.py`) with random Q4_0 weights; returns its size and the bytes a decoded token reads."""
    import gguf

    tensors = thudm_tensors(config)
    writer = gguf.GGUFWriter(path, "chatglm")
    add_gguf_metadata(writer, config, name)
    for tensor in tensors:
        byte_shape = ((tensor.shape[0], tensor.nbytes // tensor.shape[0]) if tensor.fill == "q4_0"
                      else tensor.shape)
        dtype = np.uint8 if tensor.fill == "q4_0" else np.float32
        writer.add_tensor_info(tensor.gguf, byte_shape, np.dtype(dtype), tensor.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(tensor.ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data in weights(tensors, config):
        writer.write_tensor_data(data)
    writer.close()
    return {"file_bytes": path.stat().st_size, "decode_weight_bytes": decode_bytes(tensors)}


def add_gguf_metadata(writer, config: GLMConfig, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_sequence_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.inner_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_layer_norm_rms_eps(config.layernorm_epsilon)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rotary_base)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pieces, types = spm_vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * len(pieces))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)  # as the converter: the prompt carries [gMASK] sop itself


# --- chatglm.cpp: its own "ggml" file ----------------------------------------------------------------------------

def glm4_vocab() -> bytes:
    """A tiktoken vocabulary of the 256 single bytes ("base64 rank" lines), which chatglm.cpp's GLM-4 tokenizer
    reads; its special tokens are numbered after these."""
    return b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))


def write_chatglm_cpp(path: Path, config: GLMConfig, model_type: str, tokenizer: bytes) -> dict:
    """chatglm.cpp's model file (magic "ggml", model type, config record v2, tokenizer, then named tensors) with
    random Q4_0 weights. `tokenizer`: a serialized SentencePiece model (chatglm3) or a tiktoken vocabulary (glm4)."""
    tensors = thudm_tensors(config)
    with open(path, "wb") as f:
        f.write(b"ggml" + struct.pack("ii", CHATGLM_CPP_MODEL_TYPES[model_type], 2))
        f.write(struct.pack("iiiiiiififiii", GGML_Q4_0, config.vocab_size, config.hidden_size,
                            config.num_attention_heads, config.kv_heads, config.num_layers, config.inner_hidden_size,
                            config.layernorm_epsilon, 0, config.rotary_base, config.max_sequence_length,
                            first(config.eos_token_id), config.pad_token_id))
        f.write(struct.pack("i", len(tokenizer)) + tokenizer)
        for tensor, data in weights(tensors, config):
            write_chatglm_cpp_tensor(f, tensor, data)
    return {"file_bytes": path.stat().st_size, "decode_weight_bytes": decode_bytes(tensors)}


def write_chatglm_cpp_tensor(f: BinaryIO, tensor: Tensor, data: np.ndarray) -> None:
    name = tensor.thudm.encode()
    f.write(struct.pack("i", len(name)) + name)
    f.write(struct.pack(f"i{len(tensor.shape)}ii", len(tensor.shape), *tensor.shape, tensor.ggml_type))
    f.write(b"\0" * (-f.tell() % CHATGLM_CPP_ALIGN))
    data.tofile(f)
