"""The family boundary: detection from config.json, one clear error for what glmkit does not know, and the
name mapping at load and save, so everything below the loader sees glmkit's internal names only."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmkit import GLMForCausalLM
from glmkit.cli import main
from glmkit.families import FAMILIES, Family, UnknownFamilyError, detect, family_of
from glmkit.families.chatglm6b import FAMILY as CHATGLM_6B
from glmkit.models.config import preset
from glmkit.models.positions import LAYOUTS
from glmkit.quant.quantize import QuantizedLinear

from tiny import random_model, tiny_config, tiny_glm130b_config

# https://huggingface.co/THUDM/chatglm-6b/blob/main/config.json (the keys that matter here)
OFFICIAL_CHATGLM_6B = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "position_encoding_2d": True,
                       "hidden_size": 4096, "num_layers": 28, "vocab_size": 130528}
# https://huggingface.co/THUDM/chatglm2-6b/blob/main/config.json
OFFICIAL_CHATGLM2_6B = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "multi_query_group_num": 2,
                        "padded_vocab_size": 65024, "num_layers": 28}
# https://huggingface.co/THUDM/GLM-4-9B-0414/blob/main/config.json
OFFICIAL_GLM4_0414 = {"architectures": ["Glm4ForCausalLM"], "model_type": "glm4", "num_hidden_layers": 40}


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def test_official_and_glmkit_configs_find_their_family():
    assert detect(OFFICIAL_CHATGLM_6B).name == "chatglm-6b"
    assert detect(OFFICIAL_CHATGLM2_6B).name == "chatglm2"  # same model_type, told apart by the GQA keys
    assert detect(OFFICIAL_GLM4_0414).name == "glm4"
    assert detect({**OFFICIAL_GLM4_0414, "model_type": "glm", "architectures": ["GlmForCausalLM"]}).name == "glm"
    assert detect({"hidden_size": 64}).name == "chatglm-6b"  # old glmkit directories wrote no model_type
    assert detect(preset("glm-130b").to_dict()).name == "glm-130b"
    assert family_of(tiny_config()).name == "chatglm-6b"
    assert family_of(tiny_glm130b_config()).name == "glm-130b"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_names_a_layout_and_its_tokenizer_files(name):
    family = FAMILIES[name]
    assert family.position_layout in LAYOUTS
    assert family.tokenizer_files and family.summary


@pytest.mark.parametrize("data, found", [
    (LLAMA, ["'llama'", "LlamaForCausalLM", "chatglm-6b", "chatglm2", "glm4"]),
    ({"model_type": "glm5", "architectures": ["Glm5ForCausalLM"]}, ["'glm5'", "Glm5ForCausalLM"]),
    ([1, 2], ["list", "not an object"]),
])
def test_an_unknown_family_is_one_error_naming_what_was_found(data, found):
    with pytest.raises(UnknownFamilyError) as error:
        detect(data)
    for text in found:
        assert text in str(error.value)


def test_the_cli_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LlamaForCausalLM" in err and "config.json" in err


# ----- a family whose checkpoints use other names: the loader maps them, nothing else sees them

RENAMED = Family(
    name="renamed-test", summary="ChatGLM-6B's model under other parameter names (a test family)",
    matches=lambda data: data.get("model_type") == "renamed-test",
    position_layout="2d-prefix-lm", load_tokenizer=CHATGLM_6B.load_tokenizer,
    tokenizer_files=CHATGLM_6B.tokenizer_files,
    renames=(("model.encoder.blocks.", "transformer.layers."), ("model.", "transformer.")),
    ignored=(".extra_buffer",),
)


@pytest.fixture
def renamed_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, RENAMED.name, RENAMED)
    model = random_model(tiny_config())
    state = {RENAMED.checkpoint_name(k): v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert "model.encoder.blocks.0.attention.query_key_value.weight" in state  # written by hand below, not by glmkit
    state["model.encoder.blocks.0.attention.extra_buffer"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {**model.config.to_dict(), "model_type": "renamed-test"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return model, tmp_path


def test_checkpoint_names_are_mapped_once_at_load_and_back_at_save(renamed_checkpoint, tmp_path):
    model, directory = renamed_checkpoint
    loaded = GLMForCausalLM.from_pretrained(directory, progress=False)
    ids = torch.tensor([[5, 6, 7, 251, 252]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert family_of(loaded.config) is RENAMED
    out = loaded.save_pretrained(tmp_path / "saved")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())  # noqa: SIM118
    assert "model.encoder.blocks.1.mlp.dense_4h_to_h.weight" in stored and "model.word_embeddings.weight" in stored
    assert not any(name.startswith("transformer.") for name in stored)
    assert json.loads((out / "config.json").read_text())["model_type"] == "renamed-test"
    again = GLMForCausalLM.from_pretrained(out, progress=False)
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_quantizing_while_loading_sees_internal_names(renamed_checkpoint):
    _, directory = renamed_checkpoint
    loaded = GLMForCausalLM.from_pretrained(directory, progress=False, quantize=8)
    assert isinstance(loaded.transformer.layers[1].attention.query_key_value, QuantizedLinear)


def test_v1_configs_gain_no_keys_from_the_later_architectures(tmp_path):
    """ChatGLM-6B and GLM-130B config.json stay as they were: the ChatGLM2-era switches are written only when set."""
    from glmkit.models.config import ARCHITECTURE_DEFAULTS

    for config in (preset("chatglm-6b"), preset("glm-130b"), tiny_config()):
        data = config.to_dict()
        assert not set(ARCHITECTURE_DEFAULTS) & set(data)
        assert config.kv_heads == config.num_attention_heads and config.position_layout != "causal"
    model = random_model(tiny_config())
    out = model.save_pretrained(tmp_path / "v1")
    assert json.loads((out / "config.json").read_text()) == model.config.to_dict()
