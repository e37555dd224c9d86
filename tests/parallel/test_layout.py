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


# ----- grouped-query attention (ChatGLM2/3, GLM-4): blockwise [Q | K | V], SwiGLU


def gqa_config(kv_heads=2, heads=4):
    from glmkit.families.chatglm2 import FAMILY

    from layouts import thudm_config

    return FAMILY.config(thudm_config(multi_query_group_num=kv_heads, num_attention_heads=heads,
                                      padded_vocab_size=256))


QKV_W = "transformer.layers.0.attention.query_key_value.weight"


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_gqa_split_then_merge_restores_every_parameter(kv_heads, world):
    config = gqa_config(kv_heads)
    for name, tensor in random_model(config).state_dict().items():
        parts = [split_tensor(name, tensor, rank, world, config) for rank in range(world)]
        assert torch.equal(merge_tensors(name, parts, config), tensor), name


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_rank_holds_its_query_heads_and_the_kv_heads_they_read(kv_heads):
    config = gqa_config(kv_heads)  # 4 query heads of 16
    rows = torch.arange(float((4 + 2 * kv_heads) * 16))
    q, k, v = rows.split([64, 16 * kv_heads, 16 * kv_heads])
    for world in (2, 4):
        for rank in range(world):
            part = split_tensor(QKV_W, rows[:, None], rank, world, config)[:, 0]
            group = rank * kv_heads // world if kv_heads % world == 0 else rank // (world // kv_heads)
            per = max(kv_heads // world, 1)
            want = torch.cat([q.chunk(world)[rank], k[16 * group:16 * (group + per)], v[16 * group:16 * (group + per)]])
            assert torch.equal(part, want), (world, rank)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_shares_of_some_ranks_merge_and_split_further(kv_heads):
    """A checkpoint resharded at 4 loads at 2 (two parts merged) and one at 2 loads at 4 (a part split)."""
    config = gqa_config(kv_heads)
    full = torch.randn((4 + 2 * kv_heads) * 16, 64)
    at4 = [split_tensor(QKV_W, full, r, 4, config) for r in range(4)]
    at2 = [split_tensor(QKV_W, full, r, 2, config) for r in range(2)]
    for rank in range(2):
        assert torch.equal(merge_tensors(QKV_W, at4[2 * rank:2 * rank + 2], config), at2[rank])
    for rank in range(4):
        assert torch.equal(split_tensor(QKV_W, at2[rank // 2], rank % 2, 2, config), at4[rank])


def test_swiglu_rank_holds_its_slice_of_gate_and_up():
    config = gqa_config()  # ffn 96: gate rows 0..95, up rows 96..191
    rows = torch.arange(192.0)[:, None]
    part = split_tensor("transformer.layers.0.mlp.dense_h_to_4h.weight", rows, 1, 2, config)[:, 0]
    assert part.tolist() == [*range(48, 96), *range(144, 192)]


@pytest.mark.parametrize(("kv_heads", "world"), [(2, 2), (2, 4), (1, 2)])
def test_gqa_attention_summed_over_ranks_equals_the_whole(kv_heads, world):
    from glmkit.models.glm import GroupedQKV, PartialRope, SelfAttention
    from glmkit.parallel.layout import kv_heads_per_rank

    config = gqa_config(kv_heads)
    torch.manual_seed(0)
    full = SelfAttention(config)
    x = torch.randn(2, 5, config.hidden_size)
    angles = torch.arange(5.0)[None, :, None, None] * torch.rand(8).repeat_interleave(2)
    rope = PartialRope(angles.cos().expand(2, -1, -1, -1), angles.sin().expand(2, -1, -1, -1))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    total = torch.zeros_like(x)
    for rank in range(world):
        part = SelfAttention(config)
        part.num_heads = 4 // world
        local_kv = kv_heads_per_rank(kv_heads, world)
        part.queries_per_kv_head = part.num_heads // local_kv
        part.qkv_layout = GroupedQKV(part.num_heads, local_kv, 16)
        state = {f"{n}": split_tensor(f"transformer.layers.0.attention.{n}", t, rank, world, config)
                 for n, t in full.state_dict().items()}
        part.query_key_value = torch.nn.Linear(64, state["query_key_value.weight"].shape[0])
        part.dense = torch.nn.Linear(state["dense.weight"].shape[1], 64, bias=False)
        part.load_state_dict(state)
        total += part(x, rope, causal, None)
    torch.testing.assert_close(total, full(x, rope, causal, None).detach(), rtol=1e-5, atol=1e-5)
