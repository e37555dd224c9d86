"""GLM-130B: its architecture as options of the core model, its icetk ids, positions and masks."""

import json
import math

import torch

from glmkit.config import GLMConfig, preset
from glmkit.model import MLP

from tiny import tiny_config, tiny_glm130b_config


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_geglu_mlp_gates_the_first_half_with_the_exact_erf_gelu():
    config = tiny_glm130b_config(hidden_size=8, inner_hidden_size=6)
    torch.manual_seed(0)
    mlp = MLP(config)
    assert mlp.dense_h_to_4h.weight.shape == (12, 8)  # [x1; x2], each inner_hidden_size wide
    x = torch.randn(5, 8) * 3  # large enough that tanh-GELU and erf-GELU differ
    up = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
    expected = (up[:, :6] * erf_gelu(up[:, 6:])) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
    tanh_gelu = up[:, :6] * torch.nn.functional.gelu(up[:, 6:], approximate="tanh")
    assert not torch.allclose(tanh_gelu @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias, mlp(x), atol=1e-6)


def test_glm130b_preset_is_the_released_model():
    c = preset("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.head_dim) == (70, 12288, 96, 128)
    assert (c.inner_hidden_size, c.vocab_size, c.max_sequence_length) == (32768, 150528, 2048)
    assert c.residual_alpha == math.sqrt(140)
    assert (c.mlp_type, c.position_encoding_2d, c.rotary_table_fp16) == ("geglu", False, True)
    assert (c.mask_token_id, c.gmask_token_id, c.smask_token_id) == (150000, 150001, 150002)
    assert (c.bos_token_id, c.eos_token_id, c.text_eos_token_id, c.pad_token_id) == (150004, 150005, 20002, 0)
    assert c.stop_token_ids == (150005, 20002)


def test_config_round_trips_and_chatglm_configs_gain_no_keys(tmp_path):
    c = tiny_glm130b_config()
    c.save(tmp_path)
    assert GLMConfig.from_json_file(tmp_path / "config.json").to_dict() == c.to_dict()
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rotary_table_fp16"] is True and written["smask_token_id"] == c.smask_token_id
    chatglm = tiny_config().to_dict()
    assert not {"rotary_table_fp16", "smask_token_id", "text_eos_token_id"} & set(chatglm)
