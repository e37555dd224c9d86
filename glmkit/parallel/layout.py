"""How each parameter is partitioned across tensor-parallel ranks (Megatron style), and how to split
or merge it. Pure tensor code, shared by the SwissArmyTransformer converter (merging MP shards) and
tensor-parallel execution (splitting a loaded model).

    column-parallel (dim 0, output rows)   query_key_value, dense_h_to_4h, word_embeddings, lm_head
    row-parallel (dim 1, input columns)    attention.dense.weight, dense_4h_to_h.weight
    replicated                             layer norms, attention.dense.bias, dense_4h_to_h.bias

Two layouts need care rather than a plain chunk:
  * the fused QKV is grouped per head ([q_h | k_h | v_h] for each head h), so a rank's rows are a
    contiguous block of whole heads, and the head count must divide evenly;
  * GeGLU's dense_h_to_4h is [x1; x2], and each rank holds [x1_rank; x2_rank] (its slice of *both*
    halves), so the halves are split and merged separately.
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
    return config.mlp_type == "geglu" and names.block_linear(name) == names.MLP_UP


def split_tensor(name: str, tensor: torch.Tensor, rank: int, world: int, config: GLMConfig) -> torch.Tensor:
    """Rank `rank`'s part of the full parameter `tensor` (a view where possible)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the tensor-parallel group of size {world}")
    dim = shard_dim(name)
    if dim is None or world == 1:
        return tensor
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
    if _geglu_halves(name, config):
        halves = [p.chunk(2, dim=0) for p in parts]  # each rank: [x1_rank; x2_rank]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=dim)
