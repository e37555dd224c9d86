"""Tensor-parallel partitioning: split and merge are inverses, and a split computes what the whole does."""

import pytest
import torch

from glmkit.models.glm import MLP
from glmkit.parallel.layout import merge_tensors, shard_dim, split_tensor

from tiny import random_model, tiny_config, tiny_glm130b_config


@pytest.mark.parametrize("make_config", [tiny_config, tiny_glm130b_config], ids=["chatglm", "glm130b"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_then_merge_restores_every_parameter(make_config, world):
    config = make_config()
    for name, tensor in random_model(config).state_dict().items():
        parts = [split_tensor(name, tensor, rank, world, config) for rank in range(world)]
        if shard_dim(name) is not None and world > 1:
            assert sum(p.numel() for p in parts) == tensor.numel(), name
        assert torch.equal(merge_tensors(name, parts, config), tensor), name


def test_geglu_rank_holds_its_slice_of_both_halves():
    config = tiny_glm130b_config(inner_hidden_size=8)
    rows = torch.arange(16.0)[:, None].expand(16, 3)  # row i holds i: x1 rows 0..7, x2 rows 8..15
    part = split_tensor("transformer.layers.0.mlp.dense_h_to_4h.weight", rows, 1, 2, config)
    assert part[:, 0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_qkv_rank_holds_whole_heads():
    config = tiny_glm130b_config()  # 4 heads of 16
    qkv = torch.randn(3 * 64, 64)
    part = split_tensor("transformer.layers.0.attention.query_key_value.weight", qkv, 1, 2, config)
    heads = qkv.view(4, 3, 16, 64)  # [head, q|k|v, head_dim, in]
    assert torch.equal(part.view(2, 3, 16, 64), heads[2:4])


@pytest.mark.parametrize("make_config", [tiny_config, tiny_glm130b_config], ids=["gelu", "geglu"])
def test_split_mlp_summed_over_ranks_equals_the_whole(make_config):
    """Megatron's MLP: each rank runs its columns and rows; the all-reduce sums; the bias is added once."""
    config = make_config()
    torch.manual_seed(0)
    full = MLP(config)
    x = torch.randn(3, config.hidden_size)
    world = 2
    total = torch.zeros(3, config.hidden_size)
    for rank in range(world):
        part = {name: split_tensor(f"mlp.{name}", t, rank, world, config) for name, t in full.state_dict().items()}
        h = full.activation(x @ part["dense_h_to_4h.weight"].T + part["dense_h_to_4h.bias"])
        total += h @ part["dense_4h_to_h.weight"].T
    total += full.dense_4h_to_h.bias
    torch.testing.assert_close(total, full(x).detach(), rtol=1e-5, atol=1e-5)


def test_uneven_split_says_what_to_change():
    config = tiny_glm130b_config(num_attention_heads=4)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel size 3"):
        split_tensor("transformer.layers.0.attention.query_key_value.weight", torch.zeros(192, 64), 0, 3, config)
    with pytest.raises(ValueError, match="no tensor-parallel layout is known"):
        shard_dim("transformer.prefix_encoder.embedding.weight")
    with pytest.raises(ValueError, match="differ in shape"):
        merge_tensors("transformer.word_embeddings.weight", [torch.zeros(4, 2), torch.zeros(3, 2)], config)
