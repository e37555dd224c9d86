"""Inference speed and memory of a random-weight model of a real shape: `glmkit bench`.

Full-size weights cannot be downloaded here, and speed does not depend on their values, so the
model is built with random weights of the exact shape. It is built layer by layer in its final
form (dtype, or INT8/INT4 straight away), so a 6B model never exists in fp32: that would not fit
in 24 GiB. Each measurement runs the same generation code as chat and serving (prefill, then one
cached token at a time).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.generation.generate import decode_one_token, prefill, random_prompt
from glmkit.models.config import GLMConfig, preset
from glmkit.models.modules import replace_module
from glmkit.pretrained import GLMForCausalLM
from glmkit.quant import kernels
from glmkit.quant.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    block_linears,
    default_group,
    group_for,
    max_level,
    record_quantization,
    use_kernels,
)


def thudm_shape(**overrides) -> GLMConfig:
    """A THUDM config.json of the ChatGLM2/ChatGLM3/GLM-4-9B architecture (spec 1.2: hidden 4096, SwiGLU 13696,
    32 heads of 128, 2 KV heads, untied output), read by the family as a real directory's would be."""
    data = dict(model_type="chatglm", num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32,
                kv_channels=128, multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024,
                seq_length=8192, layernorm_epsilon=1e-5, rmsnorm=True, post_layer_norm=True, add_bias_linear=False,
                add_qkv_bias=True, apply_residual_connection_post_layernorm=False, original_rope=True,
                tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    return THUDM_LAYOUT.config({**data, **overrides})


SHAPES = {
    "chatglm-6b": lambda: preset("chatglm-6b"),
    "chatglm3-6b": lambda: thudm_shape(),
    "glm-4-9b": lambda: thudm_shape(num_layers=40, padded_vocab_size=151552, seq_length=131072, rope_ratio=500,
                                    layernorm_epsilon=1.5625e-07, eos_token_id=[151329, 151336, 151338],
                                    pad_token_id=151329),
    "tiny": lambda: GLMConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_attention_heads=4,
                              inner_hidden_size=1024, max_sequence_length=1024, bos_token_id=4004,
                              eos_token_id=4005, mask_token_id=4000, gmask_token_id=4001, pad_token_id=3),
    # The new architecture at the tiny size (GQA 4 heads / 2 KV heads, SwiGLU, untied): the plumbing of the two above.
    "tiny-gqa": lambda: thudm_shape(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                                    kv_channels=64, padded_vocab_size=4096, seq_length=1024),
}


def random_model(config: GLMConfig, dtype: torch.dtype, bits: int = 0, seed: int = 0,
                 embeddings: int = 0) -> GLMForCausalLM:
    """A model of `config`'s shape with random weights, materialised one tensor at a time; with `bits`,
    the block linears are created quantized (random integers), never in full precision, and with
    `embeddings` (8 or 4 bits) the embedding table too."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GLMForCausalLM(config)
    std = 1.0 / config.hidden_size ** 0.5
    if bits:
        group = default_group(bits)
        for parent, attr, child in block_linears(model):
            replace_module(parent, attr, random_quantized(child, bits, group_for(child.in_features, group), dtype, std))
        record_quantization(model, bits, group)
    if embeddings:
        table = QuantizedEmbedding(config.vocab_size, config.hidden_size, dtype, bits=embeddings)
        table.weight.random_(-127, 128)
        table.weight_scale.fill_(std / max_level(embeddings) * 2)
        model.transformer.word_embeddings = table
        if not config.tie_word_embeddings:
            model.lm_head = random_quantized(model.lm_head, embeddings, table.group_size, dtype, std)
        config.quantization_embedding_bit = embeddings
    for module in list(model.modules()):
        if config.tie_word_embeddings and module is model.lm_head:
            continue  # the embedding table itself, tied below: never a second copy, not even for a moment
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, dtype=dtype)
            if name == "weight" and param.dim() == 1:
                value.fill_(1.0)
            elif name == "bias":
                value.zero_()
            else:
                value.normal_(0.0, std)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
    if config.tie_word_embeddings:
        model.tie_output()
    return model.eval()


def random_quantized(linear: nn.Linear, bits: int, group: int, dtype: torch.dtype, std: float) -> QuantizedLinear:
    layer = QuantizedLinear(linear.in_features, linear.out_features, bits, group, linear.bias is not None, dtype)
    layer.weight.random_(-127, 128)  # INT4: every byte is two valid nibbles
    layer.weight_scale.fill_(std / (2 ** (bits - 1) - 1) * 2)
    if layer.bias is not None:
        layer.bias.data.zero_()
    return layer


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_prefill(model: GLMForCausalLM, length: int, repeats: int) -> float:
    """Median prompt tokens per second for a prompt of `length` tokens."""
    prompt = random_prompt(model.config, length)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill(model, [prompt], length + 1)
        times.append(time.perf_counter() - start)
        model.clear_kv_cache()
    return length / statistics.median(times)


def time_decode(model: GLMForCausalLM, new_tokens: int, prompt_len: int = 32) -> list[float]:
    """Milliseconds for each of `new_tokens` cached decode steps after a short prompt."""
    prompt = random_prompt(model.config, prompt_len)
    logits, state = prefill(model, [prompt], prompt_len + new_tokens)
    steps = []
    try:
        for _ in range(new_tokens):
            token = logits.argmax(-1)
            start = time.perf_counter()
            logits = decode_one_token(model, token, state)
            steps.append((time.perf_counter() - start) * 1000)
    finally:
        model.clear_kv_cache()
    return steps


def kv_cache_bytes_per_token(model: GLMForCausalLM, length: int = 16) -> int:
    """The KV cache's bytes per token as allocated (every layer's keys and values, its KV heads only), measured
    on the buffers decoding uses, not computed from the config."""
    model.setup_kv_cache(1, length)
    try:
        total = sum(buf.numel() * buf.element_size() for layer in model.transformer.layers
                    for buf in (layer.attention.kv_cache.k, layer.attention.kv_cache.v))
    finally:
        model.clear_kv_cache()
    return total // length


def decode_weight_bytes(model: GLMForCausalLM) -> int:
    """Bytes of weights one decoded token reads, as stored: every tensor but the input embedding table, of which a
    token reads one row (a tied table is read whole, as the output layer). Over the machine's read bandwidth, this
    bounds decoding speed whatever the kernel."""
    skip = () if model.config.tie_word_embeddings else ("transformer.word_embeddings.",)
    tensors = {t.data_ptr(): t for name, t in model.state_dict(keep_vars=True).items() if not name.startswith(skip)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_bandwidth_gb_per_s(repeats: int = 5) -> float:
    """What the machine streams from memory with torch's threads (GB/s, the best of `repeats` sums of 1 GiB):
    the ceiling for decoding, which reads every weight once per token."""
    data = torch.ones(2**28)  # 1 GiB of fp32
    data.sum()  # warm-up: pages touched, threads started
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return round(data.numel() * data.element_size() / best / 1e9, 1)


def time_load(model: GLMForCausalLM, dtype: torch.dtype) -> float:
    """Seconds to load the model back from a safetensors checkpoint written to a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="glmkit-bench-") as tmp:
        model.save_pretrained(Path(tmp), dtype=dtype)
        start = time.perf_counter()
        GLMForCausalLM.from_pretrained(tmp, dtype=dtype, progress=False)
        return time.perf_counter() - start


def build(shape: str, bits: int, dtype: str, embeddings: int = 0, kernel_choice: str = "native") -> GLMForCausalLM:
    """The random-weight model `glmkit bench` measures: a shape of SHAPES, quantized as asked."""
    model = random_model(SHAPES[shape](), getattr(torch, dtype), bits, embeddings=embeddings)
    return use_kernels(model, kernel_choice)


def run(shape: str, bits: int, dtype: str, prompt_lens: list[int], new_tokens: int, measure_load: bool,
        repeats: int = 3, embeddings: int = 0, kernel_choice: str = "native") -> dict:
    """One configuration's measurements, as a JSON-ready dict (threads: as torch is set up)."""
    torch_dtype = getattr(torch, dtype)
    config = SHAPES[shape]()
    start = time.perf_counter()
    model = build(shape, bits, dtype, embeddings, kernel_choice)
    native = bits and kernels.available() and kernel_choice == "native"
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    result: dict = {
        "shape": shape, "bits": bits or None, "embedding_bits": embeddings or None, "dtype": dtype,
        "threads": torch.get_num_threads(),
        "kernels": "glmkit native (int8 activations)" if native else "pytorch (float activations)",
        "parameters": sum(p.numel() for p in model.parameters()) + quantized,
        "build_s": round(time.perf_counter() - start, 2),
        "kv_heads": config.kv_heads,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model),
    }
    result["kv_cache_values_per_token"] = result["kv_cache_bytes_per_token"] // model.dtype.itemsize
    result["decode_weight_bytes"] = decode_weight_bytes(model)  # before the first call: the stored layout
    time_prefill(model, 8, 1)  # warm-up: kernels pack their weights on first use
    result["prefill_tokens_per_s"] = {str(n): round(time_prefill(model, n, repeats), 2) for n in prompt_lens}
    steps = time_decode(model, new_tokens)
    median = statistics.median(steps[1:] if len(steps) > 1 else steps)
    result["decode_ms_per_token"] = round(median, 2)
    result["decode_tokens_per_s"] = round(1000 / median, 2)
    result["peak_rss_gib"] = round(peak_rss_gib(), 3)  # before the load test, which holds a second copy
    if measure_load:
        # safetensors are memory-mapped: this is the time until the model can run; pages are read
        # from disk (or the page cache) as the first forward pass touches them.
        result["load_s"] = round(time_load(model, torch_dtype), 2)
    return result


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_kernels": kernels.cpu_isas()[-1] if kernels.available() else None,
            "bf16_prompts": kernels.available() and kernels.dense_prompts()}


def report(results: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps({"machine": machine(), "results": results}, indent=2)
    lines = []
    for r in results:
        prefill = ", ".join(f"{n} tok: {v} tok/s" for n, v in r["prefill_tokens_per_s"].items())
        lines.append(f"{r['shape']} {('int' + str(r['bits'])) if r['bits'] else r['dtype']}: decode "
                     f"{r['decode_ms_per_token']} ms/token ({r['decode_tokens_per_s']} tok/s); prefill {prefill}; "
                     f"peak RSS {r['peak_rss_gib']} GiB; KV cache {r['kv_cache_bytes_per_token']} B/token"
                     + (f"; load {r['load_s']} s" if "load_s" in r else ""))
    return "\n".join(lines)
