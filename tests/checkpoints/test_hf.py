"""Loading and saving model directories in the official layout, and every way a download goes wrong."""

import json

import pytest
import torch

from glmkit import GLMForCausalLM
from glmkit.checkpoints.hf import CheckpointError, describe
from glmkit.models.config import ConfigError

from tiny import fp16_rounded, prompt, random_model, tiny_config, write_official_bin

IDS = torch.tensor([prompt(5, 17, 42, 99, 7)])


@pytest.fixture(scope="module")
def model():
    return random_model()


@pytest.fixture(scope="module")
def official_dir(model, tmp_path_factory):
    return write_official_bin(model, tmp_path_factory.mktemp("official"), shards=3)


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(ids).logits


def test_official_fp16_bin_shards_load_with_the_same_logits(model, official_dir):
    loaded = GLMForCausalLM.from_pretrained(official_dir, progress=False)
    assert loaded.dtype == torch.float32
    assert loaded.lm_head.weight is loaded.transformer.word_embeddings.weight
    torch.testing.assert_close(logits(loaded), logits(fp16_rounded(model)), rtol=0, atol=0)


@pytest.mark.parametrize("safe", [True, False])
def test_save_and_reload_round_trip_is_exact(official_dir, tmp_path, safe):
    loaded = GLMForCausalLM.from_pretrained(official_dir, progress=False)
    out = loaded.save_pretrained(tmp_path / "copy", safe_serialization=safe, max_shard_size="40KB")
    files = sorted(p.name for p in out.iterdir())
    stem = "model" if safe else "pytorch_model"
    assert f"{stem}.{'safetensors' if safe else 'bin'}.index.json" in files
    assert sum(f.startswith(f"{stem}-") for f in files) > 1, files
    again = GLMForCausalLM.from_pretrained(out, progress=False)
    torch.testing.assert_close(logits(again), logits(loaded), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_save_in_fp16_and_load_in_bf16(model, tmp_path):
    model.save_pretrained(tmp_path / "m", dtype="float16")
    assert [p.name for p in (tmp_path / "m").glob("*.safetensors")] == ["model.safetensors"]
    half = GLMForCausalLM.from_pretrained(tmp_path / "m", dtype="bfloat16", progress=False)
    assert half.dtype == torch.bfloat16
    full = GLMForCausalLM.from_pretrained(tmp_path / "m", progress=False)
    assert full.dtype == torch.float32
    torch.testing.assert_close(logits(half).float(), logits(full), atol=0.5, rtol=0.05)


def test_resaving_replaces_old_shards(model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_info_reads_headers(official_dir, model):
    facts = describe(official_dir)
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    n_buffers = model.config.num_layers * model.config.head_dim // 4
    vocab_x_hidden = model.config.vocab_size * model.config.hidden_size
    assert facts["parameters"] == n_params + vocab_x_hidden + n_buffers  # the file stores lm_head again
    assert facts["dtype_on_disk"] == ["float16"]
    assert len(facts["weight_files"]) == 3


# --- bad input: every error names the problem and what to do ---

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GLMForCausalLM.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        GLMForCausalLM.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    tiny_config().save(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        GLMForCausalLM.from_pretrained(tmp_path)


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_shard(official_dir, tmp_path):
    broken = copy_dir(official_dir, tmp_path / "m")
    (broken / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00003\.bin .*missing"):
        GLMForCausalLM.from_pretrained(broken, progress=False)


@pytest.mark.parametrize("safe", [True, False])
def test_truncated_file(model, tmp_path, safe):
    model.save_pretrained(tmp_path, safe_serialization=safe)
    weights = next(tmp_path.glob("*.safetensors" if safe else "*.bin"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"cannot read .*{weights.name}.*truncated or corrupt"):
        GLMForCausalLM.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("change, message", [
    ({"inner_hidden_size": 128}, r"dense_h_to_4h.weight has shape \(256, 64\).*implies \(128, 64\)"),
    ({"num_layers": 1}, r"layers.1.* does not match the weights"),
], ids=["wrong-mlp-width", "fewer-layers"])
def test_config_that_does_not_match_the_weights(official_dir, tmp_path, change, message):
    broken = copy_dir(official_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=message):
        GLMForCausalLM.from_pretrained(broken, progress=False)


def test_missing_tensor(model, tmp_path):
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.final_layernorm.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks weights for transformer.final_layernorm.bias"):
        GLMForCausalLM.from_pretrained(tmp_path, progress=False)


def test_invalid_config_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(ConfigError, match="not divisible"):
        GLMForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GLMForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"padded_vocab_size": 65024, "multi_query_group_num": 2}))
    with pytest.raises(ConfigError, match="ChatGLM2"):
        GLMForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tp, bits", [(2, 0), (4, 0), (4, 8), (4, 4)])
def test_info_counts_a_resharded_grouped_query_model_once(tmp_path, tp, bits):
    """2 KV heads over 4 ranks: each KV head is copied to the 2 ranks whose query heads read it; `glmkit info`
    counts it once, as for the unsharded checkpoint (over 2 ranks the KV heads are split, nothing is copied)."""
    from glmkit.cli import main as cli_main
    from glmkit.families import chatglm2
    from glmkit.quant.quantize import quantize_model

    from layouts import thudm_config

    model = random_model(chatglm2.FAMILY.config(thudm_config(padded_vocab_size=256)), seed=6)
    assert (model.config.num_attention_heads, model.config.kv_heads) == (4, 2)
    parameters = sum(p.numel() for p in model.parameters())
    if bits:
        model = quantize_model(model, bits, 8 if bits == 4 else 0)
    model.save_pretrained(tmp_path / "whole")
    assert cli_main(["reshard", str(tmp_path / "whole"), str(tmp_path / "sharded"), "--tp", str(tp)]) == 0
    whole = describe(tmp_path / "whole")["parameters"]
    assert whole == parameters
    sharded = describe(tmp_path / "sharded")
    assert len(sharded["weight_files"]) == tp and sharded["parameters"] == whole
