"""Loading streams shard by shard: peak memory stays near one copy of the model, never two."""

import json
import subprocess
import sys
import textwrap

import pytest

from glmkit.models.config import GLMConfig

from tiny import random_model

MiB = 2**20

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from glmkit import GLMForCausalLM

    def high_water_mark():  # VmHWM belongs to this exec'd process; ru_maxrss would include the parent's
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    base = high_water_mark()
    quantize = int(sys.argv[2]) if len(sys.argv) > 2 else None
    model = GLMForCausalLM.from_pretrained(sys.argv[1], dtype="float32", progress=False, quantize=quantize)
    peak = high_water_mark()
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"base": base, "peak": peak, "model": size}))
""")


def write_model(directory, safe: bool = True) -> None:
    # ~150M parameters: 300 MB of fp16 shards on disk, 600 MB as fp32 in memory.
    config = GLMConfig(vocab_size=32768, hidden_size=1024, num_layers=10, num_attention_heads=16,
                       inner_hidden_size=4096, torch_dtype="float16", bos_token_id=4, eos_token_id=5,
                       mask_token_id=6, gmask_token_id=7, pad_token_id=3)
    random_model(config).save_pretrained(directory, dtype="float16", max_shard_size="100MB", safe_serialization=safe)
    assert len(list(directory.glob("*model-*"))) >= 3


def measure(directory, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory), *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_peak_memory_of_loading_is_about_one_model(tmp_path, safe):
    write_model(tmp_path, safe)
    m = measure(tmp_path)
    grown = m["peak"] - m["base"]
    # One fp32 model, plus at most one fp16 shard in flight and allocator slack; two copies would be 1200 MB.
    assert grown < m["model"] + 200 * MiB, f"loading grew RSS by {grown / MiB:.0f} MiB for a {m['model'] / MiB:.0f} MiB model"


@pytest.mark.slow
def test_quantizing_while_loading_never_holds_the_full_precision_model(tmp_path):
    write_model(tmp_path)
    m = measure(tmp_path, "4")
    grown = m["peak"] - m["base"]
    # INT4 blocks + fp32 embeddings come to ~190 MiB; the fp32 model would be 608 MiB. Allowed on top:
    # one shard in flight (100 MB, memory-mapped), the embedding's fp16 and fp32 copies, allocator slack.
    assert m["model"] < 250 * MiB
    assert grown < m["model"] + 250 * MiB, f"loading grew RSS by {grown / MiB:.0f} MiB for a {m['model'] / MiB:.0f} MiB model"
    assert grown < 0.75 * 608 * MiB, "quantizing while loading held most of the fp32 model at once"
