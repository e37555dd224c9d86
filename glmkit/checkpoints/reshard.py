"""`glmkit reshard SRC DST --tp N`: rewrite a checkpoint as N per-rank files, or back into one.

    DST/config.json                      the source's, plus "tensor_parallel_size": N (N > 1)
    DST/model-tp00-of-0N.safetensors     rank 0's slice of every tensor (same names as unsharded)
    ...
    DST/model-tp{N-1}-of-0N.safetensors
    DST/model.safetensors                instead, when N = 1

Each file holds exactly what one rank keeps (tp_layout: heads, MLP columns, vocabulary rows;
replicated tensors, row-parallel biases included, in every file), so `--tp N` reads one file per
rank, and any tensor-parallel size that divides N or is a multiple of N can still load it. Ranks are
written one after another from memory-mapped sources, so memory stays near one rank's share.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from glmkit import families
from glmkit.checkpoints.files import SAFE_SINGLE, CheckpointError, remove_old_weights
from glmkit.checkpoints.hf import (
    TP_SIZE_KEY,
    copy_tokenizer,
    local_tensors,
    read_config,
    stored_tp_size,
    tp_file,
    write_config,
)
from glmkit.models.config import GLMConfig
from glmkit.models.glm import GLM
from glmkit.parallel import tp as tp_lib
from glmkit.quant.quantize import quantized_layout


def reshard(src: str | Path, dst: str | Path, tp: int) -> list[Path]:
    """Write SRC's weights split for `tp` ranks into DST; returns the files written."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    config = read_config(src)
    if dst.resolve() == src.resolve():
        raise CheckpointError("reshard writes a new directory; give a DST other than SRC")
    if tp < 1:
        raise CheckpointError(f"--tp must be at least 1, not {tp}")
    check_shardable(config, tp)
    dst.mkdir(parents=True, exist_ok=True)
    remove_old_weights(dst)
    names = [tp_file(r, tp) for r in range(tp)] if tp > 1 else [SAFE_SINGLE]
    family = families.family_of(config)
    for rank, name in enumerate(names):
        tensors = local_tensors(src, config, rank, tp, for_compute=False)
        state = {k: v.contiguous() for k, v in family.checkpoint_tensors(tensors, config)}
        save_file(state, str(dst / name), metadata={"format": "pt"})
        del state
    data = {k: v for k, v in config.to_dict().items() if k != TP_SIZE_KEY}
    write_config(GLMConfig.from_dict({**data, **({TP_SIZE_KEY: tp} if tp > 1 else {})}), dst, family)
    copy_tokenizer(src, dst, family)
    return [dst / n for n in names]


def check_shardable(config: GLMConfig, tp: int) -> None:
    """The errors loading at --tp would give, before anything is written."""
    stored = stored_tp_size(config)
    if stored % tp and tp % stored:
        raise CheckpointError(f"the source is sharded for {stored} ranks; reshard to a size that divides {stored} "
                              f"or is a multiple of it (or to 1 first, then to {tp})")
    if tp == 1:
        return
    if config.quantization_embedding_bit:
        raise CheckpointError("Quantized embeddings are not sharded yet: reshard a checkpoint quantized without "
                              "--embeddings")
    with torch.device("meta"):
        model = GLM(config)
    tp_lib.apply_tp(model, 0, tp)
    if config.quantization_bit:
        quantized_layout(model, config.quantization_bit, config.quantization_group_size, torch.float32)
        tp_lib.check_quantized_groups(model, config.quantization_bit, config.quantization_group_size, tp)
