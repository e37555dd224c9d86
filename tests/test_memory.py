"""Loading streams shard by shard: peak memory stays near one copy of the model, never two."""

import json
import subprocess
import sys
import textwrap

import pytest

from glmkit.config import GLMConfig

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
    model = GLMForCausalLM.from_pretrained(sys.argv[1], dtype="float32", progress=False)
    peak = high_water_mark()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base": base, "peak": peak, "model": size}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_peak_memory_of_loading_is_about_one_model(tmp_path, safe):
    # ~150M parameters: 300 MB of fp16 shards on disk, 600 MB as fp32 in memory.
    config = GLMConfig(vocab_size=32768, hidden_size=1024, num_layers=10, num_attention_heads=16,
                       inner_hidden_size=4096, torch_dtype="float16", bos_token_id=4, eos_token_id=5,
                       mask_token_id=6, gmask_token_id=7, pad_token_id=3)
    random_model(config).save_pretrained(tmp_path, dtype="float16", max_shard_size="100MB", safe_serialization=safe)
    assert len(list(tmp_path.glob("*model-*"))) >= 3
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    grown = m["peak"] - m["base"]
    # One fp32 model, plus at most one fp16 shard in flight and allocator slack; two copies would be 1200 MB.
    assert grown < m["model"] + 200 * MiB, f"loading grew RSS by {grown / MiB:.0f} MiB for a {m['model'] / MiB:.0f} MiB model"
