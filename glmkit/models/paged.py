"""The paged KV cache: every layer's keys and values in one pool of fixed-size blocks, shared by all requests.

A request owns a list of blocks (its block table, chosen by the engine); token i of its sequence lives in slot
i % block_size of block table[i // block_size]. Nothing is reserved per request up front, a finished request's
blocks go straight to the next one, and two requests whose prompts start the same way can point at the same full
blocks (the engine's prefix cache). The pool is allocated uninitialised, so the operating system backs it with
memory only as blocks are first written; the engine zeroes a block when it hands it out (`zero_blocks`), so a
slot that attention reads but masks out holds zeros, never garbage that could be NaN.

One forward pass (`PagedStep`) carries the tokens of several requests flattened into one row, [1, N]: every
linear layer then reads its weights once for all of them (the decode tokens of the running requests, and a chunk
of a prompt being prefilled). Only attention is per request: each `Segment` is a group of rows with the same
number of new tokens (the decode rows, one token each; or one prompt chunk), attending over their own blocks,
gathered into [rows, kv_heads, T, head_dim] with T = the longest table's slots, under the segment's mask. Masked
columns get weight 0 exactly, so the result equals the contiguous cache's up to the order of a few float sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Segment:
    """`rows` sequences with `per_row` new tokens each, tokens[start : start + rows * per_row] of the flat step
    (row-major). `gather` [rows, T]: the pool slots each row attends over, position j at column j; `allowed`
    [rows, 1, per_row, T]: True where a new token may look (its own slot included)."""

    start: int
    rows: int
    per_row: int
    gather: torch.Tensor
    allowed: torch.Tensor

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.per_row


@dataclass
class PagedStep:
    """One forward pass over the paged cache: `write` [N], the pool slot of every new token (its keys and values
    go there before attention), and the segments that cover tokens 0..N-1 in order."""

    write: torch.Tensor
    segments: list[Segment]


def kv_bytes_per_token(heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """One layer's keys and values of one token in a pool of `dtype` (int8: a float32 scale per token and head)."""
    if dtype == torch.int8:
        return 2 * heads * (head_dim + 4)
    return 2 * heads * head_dim * dtype.itemsize


class PagedKVCache(nn.Module):
    """One layer's share of the pool: keys and values [num_blocks * block_size, kv_heads, head_dim].

    dtype int8 stores each token's key and value of each head as int8 with its own float32 scale (absmax / 127):
    half a bf16 cache, a quarter of fp32, dequantized as attention gathers it."""

    def __init__(self, num_blocks: int, block_size: int, heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        self.block_size = block_size
        shape = (num_blocks * block_size, heads, head_dim)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.quantized = dtype == torch.int8
        if self.quantized:
            for name in ("k_scale", "v_scale"):
                self.register_buffer(name, torch.empty(shape[:2], dtype=torch.float32, device=device),
                                     persistent=False)

    def _pools(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.k_scale, self.v_scale] if self.quantized else [self.k, self.v]

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        """Zero these blocks (handed to a request: see the module docstring)."""
        for pool in self._pools():
            pool.view(-1, self.block_size, *pool.shape[1:])[blocks] = 0

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks dst[i] become copies of blocks src[i]."""
        for pool in self._pools():
            blocks = pool.view(-1, self.block_size, *pool.shape[1:])
            blocks[dst] = blocks[src]

    def _write(self, pool: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x [N, heads, head_dim] into `slots` of the pool."""
        if scales is None:
            pool[slots] = x.to(pool.dtype)
            return
        scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127
        pool[slots] = (x.float() / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[slots] = scale

    def _read(self, pool: torch.Tensor, scales: torch.Tensor | None, gather: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
        """The slots `gather` [rows, T] as [rows, kv_heads, T, head_dim] in `dtype`."""
        rows, span = gather.shape
        flat = gather.flatten()
        values = pool.index_select(0, flat)
        if scales is not None:
            values = values.float() * scales.index_select(0, flat)[..., None]
        return values.to(dtype).view(rows, span, *pool.shape[1:]).transpose(1, 2)

    def attend(self, step: PagedStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               expand: Callable[[torch.Tensor], torch.Tensor], prefix: torch.Tensor | None) -> torch.Tensor:
        """q [1, H, N, D], k and v [1, g, N, D] (rotated) -> attention output [1, H, N, D]. `expand` repeats KV heads
        for grouped-query attention; `prefix`: P-Tuning v2's keys and values [2, g, P, D], seen by every token."""
        k_scale, v_scale = (self.k_scale, self.v_scale) if self.quantized else (None, None)
        self._write(self.k, k_scale, step.write, k[0].transpose(0, 1))
        self._write(self.v, v_scale, step.write, v[0].transpose(0, 1))
        heads, head_dim = q.shape[1], q.shape[3]
        outputs = []
        for seg in step.segments:
            queries = q[0, :, seg.start:seg.stop].view(heads, seg.rows, seg.per_row, head_dim).transpose(0, 1)
            keys = self._read(self.k, k_scale, seg.gather, q.dtype)
            values = self._read(self.v, v_scale, seg.gather, q.dtype)
            allowed = seg.allowed
            if prefix is not None:
                keys = torch.cat([prefix[0].expand(seg.rows, -1, -1, -1), keys], dim=2)
                values = torch.cat([prefix[1].expand(seg.rows, -1, -1, -1), values], dim=2)
                allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], prefix.shape[2]), allowed], dim=-1)
            out = F.scaled_dot_product_attention(queries, expand(keys), expand(values), attn_mask=allowed)
            outputs.append(out.transpose(0, 1).reshape(heads, seg.rows * seg.per_row, head_dim))
        return torch.cat(outputs, dim=1)[None]
