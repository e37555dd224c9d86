"""How each parameter is partitioned across tensor-parallel ranks (Megatron style), and how to split
or merge it. Pure tensor code, shared by the SwissArmyTransformer converter (merging MP shards) and
tensor-parallel execution (splitting a loaded model).

    column-parallel (dim 0, output rows)   query_key_value, dense_h_to_4h, word_embeddings, lm_head
    row-parallel (dim 1, input columns)    attention.dense.weight, dense_4h_to_h.weight
    replicated                             layer norms, attention.dense.bias, dense_4h_to_h.bias

Three layouts need care rather than a plain chunk:
  * ChatGLM-6B's fused QKV is grouped per head ([q_h | k_h | v_h] for each head h), so a rank's rows are a
    contiguous block of whole heads, and the head count must divide evenly;
  * the grouped-query QKV of ChatGLM2/3 and GLM-4 is blockwise [Q | K | V] (H query heads, g KV heads; query
    head j reads KV head j // (H / g)): a rank holds [Q_rank | K_rank | V_rank], its H / N query heads and
    either its g / N KV heads (g divisible by N) or, when N is a multiple of g, a copy of the one KV head its
    query heads read (vLLM's replication). A share of some ranks is recognised by its row count, so merging
    a few ranks' parts or splitting one rank's part further works as for a whole tensor;
  * the gated MLPs' dense_h_to_4h is [x1; x2] (GeGLU; SwiGLU's [gate; up]), and each rank holds
    [x1_rank; x2_rank] (its slice of *both* halves), so the halves are split and merged separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmkit.models import names
from glmkit.models.config import GLMConfig
from glmkit.models.names import BLOCK_LINEARS

_COLUMN = [linear.path for linear in BLOCK_LINEARS if linear.split == "column"]
_ROW = [linear.path for linear in BLOCK_LINEARS if linear.split == "row"]
COLUMN_PARALLEL = (*(f"{path}.{p}" for path in _COLUMN for p in ("weight", "bias")),
                   f"{names.EMBEDDING.rpartition('.')[2]}.weight", f"{names.OUTPUT}.weight")
ROW_PARALLEL = tuple(f"{path}.weight" for path in _ROW)
REPLICATED = (f"{names.NORM}.weight", f"{names.NORM}.bias", *(f"{path}.bias" for path in _ROW))


def shard_dim(name: str) -> int | None:
    """0: split the rows (column-parallel); 1: split the columns (row-parallel); None: every rank holds it all."""
    if name.endswith(COLUMN_PARALLEL):
        return 0
    if name.endswith(ROW_PARALLEL):
        return 1
    if name.endswith(REPLICATED):
        return None
    raise ValueError(
        f"no tensor-parallel layout is known for {name!r}; glmkit partitions the float parameters of GLM "
        "(quantize or add adapters after sharding, not before)"
    )


def _check_divisible(name: str, size: int, world: int, what: str) -> None:
    if size % world:
        raise ValueError(f"{name}: {what} ({size}) is not divisible by the tensor-parallel size {world}; "
                         f"choose a size that divides {size}")


def _units(name: str, config: GLMConfig) -> tuple[int, str]:
    """The count that must divide evenly along the sharded dim, and what it is called in errors."""
    linear = names.block_linear(name)
    if linear is not None:
        return getattr(config, linear.units), linear.units
    return config.vocab_size, "vocab_size (pad the vocabulary to a multiple)"


def _geglu_halves(name: str, config: GLMConfig) -> bool:
    return config.mlp_type in ("geglu", "swiglu") and names.block_linear(name) == names.MLP_UP


def _grouped_qkv(name: str, config: GLMConfig) -> bool:
    return config.multi_query_group_num is not None and names.block_linear(name) == names.QKV


def kv_heads_per_rank(kv_heads: int, world: int) -> int:
    """A rank's KV heads: its g / N when N divides g, else one (replicated: N a multiple of g)."""
    return kv_heads // world if kv_heads % world == 0 else 1


def check_kv_heads(kv_heads: int, world: int) -> None:
    if kv_heads % world and world % kv_heads:
        raise ValueError(f"multi_query_group_num ({kv_heads} KV heads) neither divides by nor divides the "
                         f"tensor-parallel size {world}; choose a size that divides {kv_heads} or is a multiple "
                         "of it")


def _grouped_share(config: GLMConfig, rows: int) -> tuple[int, int, int]:
    """(query heads, KV heads, ranks) of a grouped QKV tensor with `rows` rows: the whole tensor (1 rank) or the
    share of one rank of `ranks`."""
    heads, kv, dim = config.num_attention_heads, config.kv_heads, config.head_dim
    for ranks in range(1, heads + 1):
        fits = heads % ranks == 0 and not (kv % ranks and ranks % kv)
        if fits and (heads // ranks + 2 * kv_heads_per_rank(kv, ranks)) * dim == rows:
            return heads // ranks, kv_heads_per_rank(kv, ranks), ranks
    raise ValueError(f"a query_key_value of {rows} rows is no tensor-parallel share of {heads} query heads and "
                     f"{kv} KV heads of {dim}; the tensor does not belong to this config")


def local_rows(name: str, rows: int, config: GLMConfig, world: int) -> int:
    """How many of a column-parallel parameter's `rows` one rank holds."""
    if not _grouped_qkv(name, config):
        return rows // world
    heads, kv, _ = _grouped_share(config, rows)
    return (heads // world + 2 * kv_heads_per_rank(kv, world)) * config.head_dim


def _split_grouped(name: str, tensor: torch.Tensor, rank: int, world: int, config: GLMConfig) -> torch.Tensor:
    heads, kv, _ = _grouped_share(config, tensor.shape[0])
    _check_divisible(name, heads, world, "num_attention_heads")
    check_kv_heads(kv, world)
    dim = config.head_dim
    q, k, v = tensor.split([heads * dim, kv * dim, kv * dim], dim=0)
    if kv % world == 0:
        k, v = k.chunk(world, dim=0)[rank], v.chunk(world, dim=0)[rank]
    else:  # the one KV head this rank's query heads read
        group = rank // (world // kv)
        k, v = k[group * dim:(group + 1) * dim], v[group * dim:(group + 1) * dim]
    return torch.cat([q.chunk(world, dim=0)[rank], k, v], dim=0)


def _merge_grouped(name: str, parts: Sequence[torch.Tensor], config: GLMConfig) -> torch.Tensor:
    heads, kv, ranks = _grouped_share(config, parts[0].shape[0])
    if ranks % len(parts):
        raise ValueError(f"{name}: {len(parts)} parts of a model split over {ranks} ranks do not make up whole ranks")
    target = ranks // len(parts)
    check_kv_heads(config.kv_heads, target)
    copies = len(parts) * kv // kv_heads_per_rank(config.kv_heads, target)  # ranks holding the same KV heads
    dim = config.head_dim
    split = [p.split([heads * dim, kv * dim, kv * dim], dim=0) for p in parts]
    return torch.cat([*(s[0] for s in split), *(s[1] for s in split[::copies]), *(s[2] for s in split[::copies])],
                     dim=0)


def split_tensor(name: str, tensor: torch.Tensor, rank: int, world: int, config: GLMConfig) -> torch.Tensor:
    """Rank `rank`'s part of the full parameter `tensor` (a view where possible)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the tensor-parallel group of size {world}")
    dim = shard_dim(name)
    if dim is None or world == 1:
        return tensor
    if _grouped_qkv(name, config):
        return _split_grouped(name, tensor, rank, world, config)
    units, what = _units(name, config)
    _check_divisible(name, units, world, what)
    if _geglu_halves(name, config):
        x1, x2 = tensor.chunk(2, dim=0)
        return torch.cat([x1.chunk(world, dim=0)[rank], x2.chunk(world, dim=0)[rank]], dim=0)
    return tensor.chunk(world, dim=dim)[rank]


def merge_tensors(name: str, parts: Sequence[torch.Tensor], config: GLMConfig) -> torch.Tensor:
    """The full parameter from every rank's part, in rank order (inverse of split_tensor)."""
    if not parts:
        raise ValueError(f"{name}: no parts to merge")
    dim = shard_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the ranks' parts differ in shape ({sorted(shapes)}); the shards do not belong "
                         "to one checkpoint")
    if _grouped_qkv(name, config):
        return _merge_grouped(name, parts, config)
    if _geglu_halves(name, config):
        halves = [p.chunk(2, dim=0) for p in parts]  # each rank: [x1_rank; x2_rank]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=dim)
