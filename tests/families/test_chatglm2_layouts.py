"""ChatGLM2/ChatGLM3/GLM-4 (THUDM layout), GlmForCausalLM and Glm4ForCausalLM checkpoints: written by hand in the
official layout, loaded, saved back in the same layout (official names, shapes and config keys), reloaded."""

import json

import pytest
import torch
from safetensors import safe_open

from glmkit import GLMForCausalLM
from glmkit.checkpoints.files import load_torch_file
from glmkit.families import detect, family_of
from glmkit.families.base import LayoutError
from glmkit.families.chatglm2 import variant

from layouts import HEAD_DIM, KV_HEADS, VOCAB, hf_config, hf_state, thudm_config, thudm_state, write_checkpoint

LAYOUTS = {
    "chatglm2": (thudm_config, lambda: thudm_state()),
    "glm": (lambda: hf_config("glm"), lambda: hf_state()),
    "glm4": (lambda: hf_config("glm4"), lambda: hf_state(sandwich=True)),
}
IDS = torch.tensor([[1, 5, 9, 100, 3, 77, 12]])


def stored(directory):
    """name -> shape of every tensor in a saved directory, and the config.json it wrote."""
    shapes = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        elif path.suffix == ".bin":
            shapes.update({k: tuple(v.shape) for k, v in load_torch_file(path).items()})
    return shapes, json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("safetensors, shards", [(True, 1), (True, 3), (False, 3)])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_loads_saves_back_in_its_own_layout_and_reloads(tmp_path, layout, safetensors, shards):
    make_config, make_state = LAYOUTS[layout]
    config, state = make_config(), make_state()
    source = write_checkpoint(tmp_path / "official", state, config, safetensors=safetensors, shards=shards,
                              dtype=torch.bfloat16 if shards > 1 else torch.float32)
    model = GLMForCausalLM.from_pretrained(source, progress=False, dtype="float32")
    assert family_of(model.config).name == layout and model.config.position_layout == "causal"
    with torch.no_grad():
        logits = model(IDS).logits
    out = model.save_pretrained(tmp_path / "saved", safe_serialization=safetensors, max_shard_size="40KB")
    shapes, saved_config = stored(out)
    expected = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("rotary_pos_emb.inv_freq")}
    assert shapes == expected  # the official names and shapes, nothing else
    assert saved_config == {**config, "torch_dtype": "float32"}  # the family's own keys, as they were
    again = GLMForCausalLM.from_pretrained(out, progress=False, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, logits, rtol=0, atol=0)


def test_thudm_weights_map_onto_the_model_as_the_spec_says(tmp_path):
    """The fused QKV rows are [q | k | v] blockwise; the KV cache holds the 2 KV heads."""
    state = thudm_state()
    model = GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path, state, thudm_config()), progress=False)
    attention = model.transformer.layers[1].attention
    torch.testing.assert_close(attention.query_key_value.weight,
                               state["transformer.encoder.layers.1.self_attention.query_key_value.weight"])
    assert attention.dense.bias is None and model.transformer.layers[0].mlp.dense_h_to_4h.bias is None
    assert model.lm_head.weight.data_ptr() != model.transformer.word_embeddings.weight.data_ptr()
    model.setup_kv_cache(1, 16)
    assert attention.kv_cache.k.shape == (1, KV_HEADS, 16, HEAD_DIM)


def test_glm_q_k_v_are_fused_into_the_blockwise_qkv(tmp_path):
    state = hf_state()
    model = GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path, state, hf_config()), progress=False)
    fused = model.transformer.layers[0].attention.query_key_value
    parts = [state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    torch.testing.assert_close(fused.weight, torch.cat(parts))
    assert model.config.stop_token_ids == (2, 5, 7)


def test_detection_and_variants():
    assert detect(thudm_config()).name == "chatglm2"
    assert detect(hf_config("glm")).name == "glm" and detect(hf_config("glm4")).name == "glm4"
    assert variant(thudm_config(padded_vocab_size=151552)) == "glm-4"
    assert variant(thudm_config(_name_or_path="THUDM/chatglm3-6b")) == "chatglm3"
    assert variant(thudm_config()) == "chatglm2"


def test_chatglm3_is_told_by_its_tokenizer_files(tmp_path):
    (tmp_path / "tokenization_chatglm.py").write_text('role_special_tokens = ["<|system|>", "<|user|>", '
                                                       '"<|assistant|>", "<|observation|>"]')
    assert variant(thudm_config(), tmp_path) == "chatglm3"


def test_chatglm3_and_glm4_rope_ratio_is_the_base_and_goes_back_as_written(tmp_path):
    # (ChatGLM2's rope_ratio divides the positions instead: tests/models/test_rope_ratio.py)
    config = thudm_config(rope_ratio=500, padded_vocab_size=VOCAB, _name_or_path="THUDM/chatglm3-6b-128k")
    model = GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path / "a", thudm_state(), config), progress=False)
    assert model.config.rotary_base == 5_000_000
    assert json.loads((model.save_pretrained(tmp_path / "b") / "config.json").read_text())["rope_ratio"] == 500


def test_a_checkpoint_missing_a_part_or_mixing_layouts_is_one_clear_error(tmp_path):
    state = hf_state()
    del state["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(LayoutError, match="incomplete or mixes layouts"):
        GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path / "a", state, hf_config()), progress=False)
    mixed = {**hf_state(), "transformer.encoder.layers.0.self_attention.dense.weight": torch.zeros(64, 64)}
    with pytest.raises(Exception, match="does not match the weights|another architecture"):
        GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path / "b", mixed, hf_config()), progress=False)


@pytest.mark.parametrize("config, match", [
    (hf_config(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (hf_config(hidden_act="gelu"), "silu"),
    (thudm_config(multi_query_attention=False), "multi_query_attention"),
])
def test_what_glmkit_does_not_run_yet_is_refused(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        GLMForCausalLM.from_pretrained(write_checkpoint(tmp_path, thudm_state(), config), progress=False)
