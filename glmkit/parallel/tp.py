"""Tensor parallelism, Megatron style, on torch.distributed (launched by torchrun): a pass over the model.

    word_embeddings   vocab-parallel: rank r holds ids [r*V/N, (r+1)*V/N); an all-reduce sums the lookups
    query_key_value   column-parallel: rank r holds heads [r*H/N, (r+1)*H/N) (ChatGLM-6B: rows grouped per head;
                      grouped-query attention: [Q_r | K_r | V_r], its query heads and the KV heads they read,
                      split when N divides the g KV heads, one replicated per rank when N is a multiple of g)
    attention.dense   row-parallel: its input is the rank's heads; an all-reduce sums the partial outputs
    dense_h_to_4h     column-parallel (GeGLU, SwiGLU: [x1_r; x2_r], see parallel.layout)
    dense_4h_to_h     row-parallel, all-reduce
    lm_head           vocab-parallel logits (tied or not), all-gathered so every rank holds the full logits
    norms (LayerNorm, RMSNorm, sandwich norms), biases of row-parallel layers: replicated (the bias is added by
    rank 0 only, before the sum; the grouped-query families have none)

The model is built on the meta device, `apply_tp` gives its layers their local shapes and divided head
counts, and the loader fills them with the rank's slices only (checkpoint.load_model). Every rank ends
with the same full logits, and the global RNG is seeded identically on every rank at start-up, so each
rank samples the same tokens without sending them around.

Two process groups: the default one (NCCL on GPUs, gloo on CPU) carries the model's collectives with a
short timeout, so a dead or hung rank turns into an error instead of a hang; a gloo "control" group with
no practical timeout carries rank 0's inputs (prompts, engine steps), for which the other ranks may
wait as long as a user takes to type.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glmkit.models.glm import GroupedQKV
from glmkit.models.modules import replace_module
from glmkit.parallel.layout import kv_heads_per_rank, local_rows, merge_tensors, shard_dim, split_tensor
from glmkit.quant.quantize import QuantizedLinear

DEFAULT_TIMEOUT_S = 300.0
LEAVE_TIMEOUT_S = 30.0  # how long a finished rank waits for the others at exit
_control: Any = None


class TPError(RuntimeError):
    """Tensor parallelism that cannot be set up as asked, with what to do about it."""


def init(tp: int, device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the torchrun job (once per process); returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    global _control
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp or "RANK" not in os.environ:
        raise TPError(f"--tp {tp} needs {tp} processes started by torchrun (this one sees WORLD_SIZE={world}); "
                      f"run: torchrun --nproc-per-node {tp} -m glmkit ... --tp {tp}")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        # Left to the interpreter's teardown, gloo's threads were now and then destroyed while joinable,
        # and a rank that had finished its work died with SIGABRT ("terminate called without an active
        # exception"), failing the whole torchrun job. So ranks leave together, explicitly.
        atexit.register(_leave)
        _control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        seed = broadcast_object(int(torch.randint(0, 2**62, ()).item()) if rank() == 0 else None)
        torch.manual_seed(seed)  # identical sampling on every rank (they all see the same logits)
    return device


def _leave() -> None:
    """Every rank reaches this point before any closes its connections: a rank whose peer vanished
    mid-teardown aborted too. The wait is short: a rank leaving on an error, with its peers stuck in a
    collective, must not wait out the collective timeout before torchrun can stop the job."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone or stuck: nothing is left to coordinate
            dist.monitored_barrier(_control, timeout=timedelta(seconds=LEAVE_TIMEOUT_S))  # gloo, also on GPUs
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank, over the control group (waits without a timeout)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def silence_other_ranks() -> None:
    """Only rank 0 talks to the user; the others would print the same text N times."""
    if os.environ.get("RANK", "0") != "0":  # known from torchrun before the process group exists
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)


def fail(error: BaseException) -> None:
    """A failed collective leaves the ranks out of step: nothing can be retried, so stop this process."""
    print(f"glmkit: error: tensor-parallel rank {rank()} stops: {error} (a rank died, hung past --tp-timeout, "
          "or failed); restart the whole job", file=sys.stderr, flush=True)
    os._exit(3)


def check_divisible(config, world_size: int) -> None:
    """Heads, MLP width and vocabulary must split evenly, and the KV heads split or replicate evenly; say which
    one does not (in one line). A P-Tuning v2 prefix holds every head's keys and values, so it is refused."""
    if config.pre_seq_len:
        raise TPError(f"this model has a P-Tuning v2 prefix (pre_seq_len {config.pre_seq_len}), which is not sharded "
                      "across ranks: run it without --tp, or fine-tune with LoRA and fold it in (glmkit merge)")
    sizes = {"num_attention_heads": config.num_attention_heads, "inner_hidden_size": config.inner_hidden_size,
             "vocab_size": config.vocab_size}
    for name, size in sizes.items():
        if size % world_size:
            raise TPError(f"{name} {size} does not divide by --tp {world_size}; choose a tensor-parallel size that "
                          f"divides {', '.join(f'{k} {v}' for k, v in sizes.items())}")
    if config.multi_query_group_num is not None:
        kv = config.kv_heads
        if kv % world_size and world_size % kv:
            raise TPError(f"multi_query_group_num {kv} (KV heads) neither divides by --tp {world_size} nor divides "
                          f"it; choose a tensor-parallel size that divides {kv} (KV heads split) or a multiple of "
                          f"{kv} that divides num_attention_heads {config.num_attention_heads} (KV heads replicated)")


def check_quantized_groups(model: nn.Module, bits: int, group_size: int, world_size: int) -> None:
    """A group-wise scale must not straddle two ranks, else a rank's part would be quantized differently."""
    if not group_size:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | QuantizedLinear) and shard_dim(f"{name}.weight") == 1:
            full = module.in_features * world_size
            if full % group_size == 0 and module.in_features % group_size:
                raise TPError(f"{name}: INT{bits} groups of {group_size} columns do not divide its {full} inputs "
                              f"split over {world_size} ranks; use a smaller --tp or quantize with a group size "
                              f"that divides {module.in_features}")


class VocabParallelEmbedding(nn.Embedding):
    """The rank's rows of the embedding; ids outside them look up zeros, and the all-reduce fills them in."""

    vocab_start: int = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        dist.all_reduce(out)
        return out


def _all_reduce(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def _gather_vocab(_module, _inputs, logits: torch.Tensor) -> torch.Tensor:
    """[..., V/N] on each rank -> [..., V] on every rank, in rank order."""
    parts = [torch.empty_like(logits) for _ in range(world())]
    dist.all_gather(parts, logits.contiguous())
    return torch.cat(parts, dim=-1)


def _local_linear(name: str, linear: nn.Linear, dim: int, world_size: int, config) -> nn.Linear:
    """An empty (meta) Linear with the rank's share of the output (dim 0) or input (dim 1) features."""
    out_f, in_f = linear.out_features, linear.in_features
    out_f, in_f = (local_rows(name, out_f, config, world_size), in_f) if dim == 0 else (out_f, in_f // world_size)
    return nn.Linear(in_f, out_f, bias=linear.bias is not None, device="meta")


def apply_tp(model: nn.Module, rank_: int, world_size: int) -> nn.Module:
    """Give a meta-device GLM its local shapes for rank `rank_` of `world_size`, and the collectives.

    Runs before loading (and before quantized layers are laid out), so only the rank's slices are ever
    allocated. The config keeps the global sizes; the attention modules hold the local head count."""
    config = model.config
    check_divisible(config, world_size)
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            weight = f"{name}.{attr}.weight".lstrip(".")
            if isinstance(child, nn.Linear) and (dim := shard_dim(weight)) is not None:
                replace_module(module, attr, _local_linear(weight, child, dim, world_size, config))
    for layer in model.transformer.layers:
        attention = layer.attention
        kv_heads = kv_heads_per_rank(attention.num_kv_heads, world_size)
        attention.num_heads //= world_size
        attention.queries_per_kv_head = attention.num_heads // kv_heads
        if isinstance(attention.qkv_layout, GroupedQKV):
            attention.qkv_layout.heads, attention.qkv_layout.kv_heads = attention.num_heads, kv_heads
        layer.attention.register_forward_hook(_all_reduce)
        layer.mlp.register_forward_hook(_all_reduce)
    embedding = VocabParallelEmbedding(config.vocab_size // world_size, config.hidden_size, device="meta")
    embedding.vocab_start = rank_ * embedding.num_embeddings
    model.transformer.word_embeddings = embedding
    if config.tie_word_embeddings:
        model.lm_head.weight = embedding.weight
    model.lm_head.register_forward_hook(_gather_vocab)
    model.tp_rank, model.tp_world = rank_, world_size
    return model


def split_local(name: str, tensor: torch.Tensor, rank_: int, piece: int, pieces: int, config) -> torch.Tensor:
    """Piece `piece` of `pieces` of a checkpoint tensor, as tensor-parallel rank `rank_` keeps it.

    Row-parallel biases are kept by rank 0 only (zeros elsewhere): the all-reduce adds them once."""
    if name.endswith(".bias") and shard_dim(name.removesuffix("bias") + "weight") == 1 and rank_ != 0:
        return torch.zeros_like(tensor)
    follows = _follows(name, tensor)
    return tensor if follows is None or pieces == 1 else split_tensor(follows, tensor, piece, pieces, config)


def merge_local(name: str, parts: list[torch.Tensor], config) -> torch.Tensor:
    """One tensor from consecutive ranks' parts (replicated tensors: the first)."""
    follows = _follows(name, parts[0])
    return parts[0] if follows is None or len(parts) == 1 else merge_tensors(follows, parts, config)


def _follows(name: str, tensor: torch.Tensor) -> str | None:
    """The parameter whose partition a tensor follows; None when every rank holds all of it.

    A quantization scale follows its weight's rows, but a per-row scale of a row-parallel layer
    covers the whole row, so every rank keeps it."""
    if name.endswith(".weight_scale"):
        weight = name.removesuffix("_scale")
        return None if tensor.dim() == 1 and shard_dim(weight) == 1 else weight
    return name if shard_dim(name) is not None else None


def row_absmax_reducer(module_name: str, group_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Quantizing a row-parallel layer per row while loading: each rank sees part of a row, and the
    scale must be the whole row's absmax (as at TP=1), so the ranks take the maximum together."""
    if group_size or shard_dim(f"{module_name}.weight") != 1 or world() == 1:
        return None

    def reduce(absmax: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX)
        return absmax

    return reduce


__all__ = ["TPError", "apply_tp", "init", "merge_local", "rank", "split_local", "world"]
