"""The GLM transformer as every GLM generation uses it, read top to bottom.

    input_ids ─ word_embeddings ─┬─ GLMBlock x num_layers ─ final_layernorm ─ lm_head ─ logits
                                 │
    GLMBlock (residual r(h, x): DeepNorm's alpha * x, the *normalised* input (ChatGLM-6B, GLM-130B), or h, the
    block input (pre-norm: ChatGLM2/3, GLM-4); post_*_layernorm are GLM-4-0414's sandwich norms, else identity):
        x = input_layernorm(h);          h = r(h, x) + post_self_attn_layernorm(attention(x))
        x = post_attention_layernorm(h); h = r(h, x) + post_mlp_layernorm(mlp(x))

    The generations differ only where the config says so (modules chosen in __init__, no branches in forward):
                     ChatGLM-6B              GLM-130B              ChatGLM2/3, GLM-4 (THUDM, glm)   GLM-4-0414 (glm4)
    norm             LayerNorm               LayerNorm             RMSNorm (rmsnorm)                 RMSNorm
    residual         alpha * x, sqrt(2*28)   alpha * x, sqrt(2L)   h (apply_residual_..._layernorm)  h
    sandwich norms   -                       -                     -                                 yes (sandwich_norm)
    attention        MHA, prefix-LM mask     MHA, prefix-LM mask   GQA, g = multi_query_group_num    GQA
                                                                   KV heads, causal (causal)
    fused QKV        per head [q_h|k_h|v_h]  per head              blockwise [Q | K | V]             blockwise
    biases           every linear            every linear          QKV only (add_bias_linear, add_qkv_bias)
    rotary           2D, NeoX halves on      1D, NeoX, full head,  1D, adjacent pairs on the first half of
                     each half of the head   fp16 table            each head, base 10000 * rope_ratio (rotary_style,
                                                                   partial_rotary_factor, rotary_base); ChatGLM2-
                                                                   32K: positions / rope_ratio, base 10000
                                                                   (rotary_position_interpolation)
    mlp              gelu(tanh)              x1 * gelu(x2)         silu(x1) * x2 (mlp_type swiglu)
    output layer     tied                    tied                  untied (tie_word_embeddings)

Parameter names are glmkit's internal ones, ChatGLM-6B's official names (`transformer.layers.0.attention.
query_key_value`...; glmkit.models.names); each family maps its checkpoint's names onto them. Activations are
[batch, seq, hidden] (the official code uses [seq, batch, hidden]; the numbers are the same). Masks follow the
official convention: bool, True = blocked. The KV cache holds the key/value heads only (g under GQA).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.models.config import GLMConfig
from glmkit.models.paged import PagedKVCache, PagedStep
from glmkit.models.positions import LAYOUTS, PositionLayout, SpecialIds, model_layout

# Where new tokens go in the KV cache: one offset for the whole batch, or one per row (decoding
# requests of different lengths together), or a PagedStep over the paged cache (the engine), or None without a cache.
CachePosition = int | torch.Tensor | PagedStep | None


class RotaryEmbedding(nn.Module):
    """cos/sin of rotary angles, computed per call from explicit positions.

    `inv_freq` is rounded to fp16 because the official code does so unconditionally; without it
    fp32 logits drift by ~1e-3. In fp16 the official code also multiplies positions by inv_freq in
    fp16, which we reproduce; in fp32 and bf16 the angles are computed in fp32 (the official bf16 path
    builds positions in bf16, losing integers above 256, which we deliberately do not copy).
    With `fp16_table` (GLM-130B's SwissArmyTransformer) the whole table is fp16 whatever the dtype:
    positions, their products with inv_freq, and cos/sin are each rounded to fp16."""

    def __init__(self, dim: int, base: float, fp16_table: bool = False) -> None:
        super().__init__()
        self.dim, self.base, self.fp16_table = dim, base, fp16_table

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # Computed per call (a few dozen numbers), so a model built on the meta device needs no fix-up.
        return (1.0 / self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim)).half().float()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, S, 1, dim] (the 1 broadcasts over heads)."""
        table = torch.float16 if dtype == torch.float16 or self.fp16_table else torch.float32
        freqs = positions.to(table)[..., None] * self.inv_freq(positions.device).to(table)  # [B, S, dim/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :].float()
        # cos/sin computed in fp32 and rounded once to the table's precision, as fp16 kernels do.
        return angles.cos().to(table).to(dtype), angles.sin().to(table).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX convention: the two halves of the last dim form the (real, imag) pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class InterleavedRotaryEmbedding(nn.Module):
    """ChatGLM2/3, GLM-4 and transformers' glm/glm4: theta_i = base^(-2i/dim), angles p * theta_i in fp32,
    cos/sin cast to the activations' dtype once (as the ChatGLM3/GLM-4 code and transformers do), each value
    repeated for the two dims (2i, 2i+1) of its pair. With `interpolation` (ChatGLM2-6B-32K's rope_ratio) p is
    the position divided by it."""

    def __init__(self, dim: int, base: float, interpolation: float = 1.0) -> None:
        super().__init__()
        self.dim, self.base, self.interpolation = dim, base, interpolation

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, S, 1, dim]."""
        theta = 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32)
                                    / self.dim)
        p = positions.float() if self.interpolation == 1 else positions.float() / self.interpolation
        angles = (p[..., None] * theta).repeat_interleave(2, dim=-1)[:, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GPT-J convention: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class KVCache(nn.Module):
    """Pre-allocated keys and values of one layer, [batch, heads, max_length, head_dim].

    Keys are stored after rotary embedding, so decoding never re-rotates the past."""

    def __init__(self, batch_size: int, max_length: int, heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, S, D] at positions start..start+S; return everything up to there.

        `start` may also be a LongTensor [B] of per-row positions for one token each (S = 1): that is
        how continuous batching decodes requests of different lengths in one step. Rows are then
        the first B slots of the cache, and the caller's mask says which positions each row may see."""
        if isinstance(start, torch.Tensor):
            rows = torch.arange(k.shape[0], device=k.device)
            end = int(start.max()) + 1
            self._check_room(end)
            self.k[rows, :, start] = k[:, :, 0]
            self.v[rows, :, start] = v[:, :, 0]
            return self.k[: k.shape[0], :, :end], self.v[: k.shape[0], :, :end]
        end = start + k.shape[2]
        self._check_room(end)
        self.k[: k.shape[0], :, start:end] = k
        self.v[: k.shape[0], :, start:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: k.shape[0], :, :end]

    def select_rows(self, rows: torch.Tensor, length: int) -> None:
        """Rows 0..len(rows) become copies of rows `rows` (first `length` slots): beams forking and dying."""
        for buffer in (self.k, self.v):  # index_select copies first, so overlapping rows are safe
            buffer[: len(rows), :, :length] = buffer[:, :, :length].index_select(0, rows)

    def _check_room(self, end: int) -> None:
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens; writing up to {end} overflows it")

    def grown(self, max_length: int, keep: int) -> KVCache:
        """A cache of `max_length` slots holding this one's first `keep` (a follow-up that needs more room)."""
        batch, heads, _, head_dim = self.k.shape
        bigger = KVCache(batch, max_length, heads, head_dim, self.k.dtype, self.k.device)
        bigger.k[:, :, :keep] = self.k[:, :, :keep]
        bigger.v[:, :, :keep] = self.v[:, :, :keep]
        return bigger


@dataclass
class RetainedKV:
    """A finished one-row generation's caches, kept off the layers together with the ids they hold (slot i holds
    the keys and values of ids[i]), for a follow-up request whose ids start the same way: chat's next turn.

    Valid only under a causal layout, where a token's keys and values depend on the tokens before it alone (the
    prefix-LM layouts re-read their whole context bidirectionally). Any setup_kv_cache or clear_kv_cache drops it,
    so a model used for anything else in between (generate, beams, infilling, the engine) starts afresh."""

    ids: tuple[int, ...]
    caches: list[KVCache]

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids `ids` shares with the cached ones."""
        n = 0
        for cached, new in zip(self.ids, ids, strict=False):
            if cached != new:
                break
            n += 1
        return n

    def matches(self, dtype: torch.dtype, device: torch.device) -> bool:
        """False once the model moved or changed dtype since the caches were written."""
        k = self.caches[0].k
        return k.dtype == dtype and k.device == device


@dataclass
class Rope:
    """The rotary tables of one forward pass, shared by every layer."""

    cos: torch.Tensor  # [B, S, 1, rotary_dim], or [2, B, S, 1, rotary_dim] for 2D positions
    sin: torch.Tensor
    two_d: bool

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D]. 2D: first half of each head by position, second half by block position."""
        if not self.two_d:
            return apply_rotary(x, self.cos, self.sin)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([apply_rotary(x1, self.cos[0], self.sin[0]), apply_rotary(x2, self.cos[1], self.sin[1])], -1)


@dataclass
class PartialRope:
    """Rotary tables for adjacent pairs on the first `cos.shape[-1]` dims of each head; the rest pass through."""

    cos: torch.Tensor  # [B, S, 1, rotary_dim]
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rotated, rest = x.split([self.cos.shape[-1], x.shape[-1] - self.cos.shape[-1]], dim=-1)
        return torch.cat([rotated * self.cos + rotate_pairs(rotated) * self.sin, rest], dim=-1)


class PerHeadQKV(nn.Module):
    """ChatGLM-6B's fused projection, interleaved per head: [q_h | k_h | v_h] for each head h (as many KV heads
    as query heads; the head count follows the tensor, so a tensor-parallel rank's share needs nothing else)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, H * 3D] -> q, k, v [B, S, H, D]."""
        return qkv.unflatten(-1, (-1, 3 * self.head_dim)).split(self.head_dim, dim=-1)

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        return kv


class GroupedQKV(nn.Module):
    """ChatGLM2 and later: blockwise [all query heads | g key heads | g value heads]; query head j reads KV head
    j // (heads / g), so the cache holds g heads and they are repeated only for the attention product."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def forward(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, S, (H + 2g) * D] -> q [B, S, H, D], k, v [B, S, g, D]."""
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        return (t.unflatten(-1, (-1, self.head_dim)) for t in (q, k, v))

    def expand(self, kv: torch.Tensor) -> torch.Tensor:
        """[B, g, T, D] -> [B, H, T, D]."""
        return kv.repeat_interleave(self.heads // self.kv_heads, dim=1)


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.queries_per_kv_head = config.num_attention_heads // config.kv_heads
        width, kv_width = config.num_attention_heads * self.head_dim, config.kv_heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width + 2 * kv_width,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(width, config.hidden_size, bias=config.add_bias_linear)
        self.qkv_layout = (PerHeadQKV(self.head_dim) if config.multi_query_group_num is None
                           else GroupedQKV(config.num_attention_heads, config.kv_heads, self.head_dim))
        self.kv_cache: KVCache | None = None

    @property
    def num_kv_heads(self) -> int:
        """This module's key/value heads (under tensor parallelism, the rank's share)."""
        return self.num_heads // self.queries_per_kv_head

    def forward(self, x: torch.Tensor, rope: Rope, allowed: torch.Tensor | None, cache_position: CachePosition,
                prefix: torch.Tensor | None = None):
        batch, seq, _ = x.shape
        q, k, v = self.qkv_layout(self.query_key_value(x))  # q [B, S, H, D]; k, v [B, S, g, D]
        q, k = rope.apply(q), rope.apply(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
        if isinstance(cache_position, PagedStep):  # the engine's flat step: attention per request, over its blocks
            out = self.kv_cache.attend(cache_position, q, k, v, self.qkv_layout.expand, prefix)
            return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))
        if self.kv_cache is not None and cache_position is not None:
            k, v = self.kv_cache.update(cache_position, k, v)  # [B, g, T, D]
        if prefix is not None:  # P-Tuning v2 keys/values [2, g, P, D], in front of everything, unrotated
            k = torch.cat([prefix[0].expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(batch, -1, -1, -1), v], dim=2)
        # The official (layer_id + 1) query scaling cancels out; it only guards fp16 overflow, which
        # SDPA's fp32 accumulation already avoids.
        out = F.scaled_dot_product_attention(q, self.qkv_layout.expand(k), self.qkv_layout.expand(v),
                                             attn_mask=allowed)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))


class GeGLU(nn.Module):
    """GLM-130B's gated GELU: the up-projection's first half, gated by the GELU of its second half.

    x [..., 2 * inner] = [x1 | x2] -> x1 * gelu(x2) [..., inner], with the exact erf GELU, as
    SwissArmyTransformer's F.gelu (ChatGLM-6B's tanh approximation would drift from the checkpoint)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x1 * F.gelu(x2)


class SwiGLU(nn.Module):
    """ChatGLM2 and later: x [..., 2 * inner] = [x1 | x2] -> silu(x1) * x2 (SiLU on the *first* half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate="tanh"), "geglu": GeGLU, "swiglu": SwiGLU}


class MLP(nn.Module):
    """dense_h_to_4h -> activation -> dense_4h_to_h; the gated MLPs' up-projection is twice as wide."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        gated = config.mlp_type in ("geglu", "swiglu")
        width = 2 * config.inner_hidden_size if gated else config.inner_hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear)
        self.activation = ACTIVATIONS[config.mlp_type]()
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))


class RMSNorm(nn.Module):
    """THUDM's RMSNorm: x * rsqrt(mean(x^2) + eps) and the weight product in fp32, cast to x's dtype once."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(variance + self.eps))).to(x.dtype)


def norm(config: GLMConfig) -> nn.Module:
    """The model's norm: RMSNorm (rmsnorm) or LayerNorm."""
    return (RMSNorm if config.rmsnorm else nn.LayerNorm)(config.hidden_size, eps=config.layernorm_epsilon)


class NormedResidual(nn.Module):
    """DeepNorm-style (ChatGLM-6B, GLM-130B): the residual is the normalised input, scaled by alpha."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


class InputResidual(nn.Module):
    """Pre-norm (ChatGLM2 and later): the residual is the sublayer's input."""

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return h


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.residual = (NormedResidual(config.residual_alpha) if config.apply_residual_connection_post_layernorm
                         else InputResidual())
        sandwich = (lambda: norm(config)) if config.sandwich_norm else nn.Identity
        self.input_layernorm = norm(config)
        self.attention = SelfAttention(config)
        self.post_self_attn_layernorm = sandwich()
        self.post_attention_layernorm = norm(config)  # before the MLP (the name is ChatGLM-6B's)
        self.mlp = MLP(config)
        self.post_mlp_layernorm = sandwich()

    def forward(self, h: torch.Tensor, rope: Rope, allowed: torch.Tensor | None, cache_position: CachePosition,
                prefix: torch.Tensor | None = None):
        x = self.input_layernorm(h)
        h = self.residual(h, x) + self.post_self_attn_layernorm(self.attention(x, rope, allowed, cache_position,
                                                                               prefix))
        x = self.post_attention_layernorm(h)
        return self.residual(h, x) + self.post_mlp_layernorm(self.mlp(x))


class PrefixEncoder(nn.Module):
    """P-Tuning v2: `pre_seq_len` trained keys and values for every layer, the only trained weights.

    The parameter names are the official ones (`embedding`, `trans`), so official P-Tuning
    checkpoints load as they are. At inference the prefix never changes, so it is computed once and
    kept until the next training step or load."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        assert config.pre_seq_len, "PrefixEncoder needs config.pre_seq_len"
        self.pre_seq_len, self.num_layers = config.pre_seq_len, config.num_layers
        self.heads, self.head_dim = config.kv_heads, config.head_dim  # sized for the key/value heads
        width = config.num_layers * 2 * config.kv_heads * config.head_dim
        if config.prefix_projection:
            # ChatGLM-6B projects from the hidden size; ChatGLM2/3 from the prefix's own width, through hidden.
            source = config.hidden_size if config.multi_query_group_num is None else width
            self.embedding = nn.Embedding(config.pre_seq_len, source)
            self.trans = nn.Sequential(nn.Linear(source, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)
            self.trans = None
        self.dropout = nn.Dropout(0.1)  # the official training recipe's; off in eval mode
        self._cached: torch.Tensor | None = None

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        """[layers, 2, kv heads, pre_seq_len, head_dim]: layer i's keys at [i, 0], values at [i, 1]."""
        if self.training or torch.is_grad_enabled():
            self._cached = None
            return self._compute(dtype)
        if self._cached is None or self._cached.dtype != dtype:
            self._cached = self._compute(dtype)
        return self._cached

    def _compute(self, dtype: torch.dtype) -> torch.Tensor:
        out = self.embedding.weight
        if self.trans is not None:
            out = self.trans(out)
        out = self.dropout(out.view(self.pre_seq_len, self.num_layers, 2, self.heads, self.head_dim))
        return out.permute(1, 2, 3, 0, 4).to(dtype)

    def _apply(self, fn, recurse=True):
        self._cached = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None
        return super()._load_from_state_dict(*args, **kwargs)


class GLMTransformer(nn.Module):
    """Embeddings, blocks and the final norm: token ids in, hidden states out."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = norm(config) if config.post_layer_norm else nn.Identity()
        if config.rotary_style == "interleaved":
            self.rotary = InterleavedRotaryEmbedding(config.rotary_dim, config.rotary_base,
                                                     config.rotary_position_interpolation)
        else:
            self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base, config.rotary_table_fp16)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rope | PartialRope:
        """position_ids [B, P, S] with P = 2 (position, block position) or 1."""
        if isinstance(self.rotary, InterleavedRotaryEmbedding):
            return PartialRope(*self.rotary(position_ids[:, 0], dtype))
        if self.config.position_encoding_2d:
            tables = [self.rotary(position_ids[:, i], dtype) for i in range(2)]
            return Rope(torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables]), two_d=True)
        cos, sin = self.rotary(position_ids[:, 0], dtype)
        return Rope(cos, sin, two_d=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache_position: CachePosition = None,
    ) -> torch.Tensor:
        h = self.word_embeddings(input_ids)
        rope = self.rope(position_ids, h.dtype)
        allowed = None if attention_mask is None else _allowed(attention_mask, cache_position)
        if self.prefix_encoder is None:
            for layer in self.layers:
                h = layer(h, rope, allowed, cache_position)
            return self.final_layernorm(h)
        prefix = self.prefix_encoder(h.dtype)
        if allowed is not None:  # every token sees the whole prefix
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], prefix.shape[3]), allowed], dim=-1)
        for layer, layer_prefix in zip(self.layers, prefix, strict=True):
            h = layer(h, rope, allowed, cache_position, layer_prefix)
        return self.final_layernorm(h)


def _allowed(blocked: torch.Tensor, offset: CachePosition) -> torch.Tensor:
    """Invert an official mask [B, 1, S, T] and open each token to itself.

    Padding rows are fully blocked in the official mask; the official softmax turns them into a
    uniform average, SDPA would turn them into NaN. Letting a pad see itself keeps them finite and
    changes nothing for real tokens, which never attend to pads. (Per-row cache positions come from
    the batching engine, whose masks always open each token to itself.)"""
    allowed = ~blocked.bool()
    if isinstance(offset, torch.Tensor):
        return allowed
    offset = offset or 0
    seq = allowed.shape[-2]
    rows = torch.arange(seq, device=allowed.device)
    diagonal = torch.zeros_like(allowed[0, 0])
    diagonal[rows, rows + offset] = True
    return allowed | diagonal


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, vocab] (or [B, 1, vocab] with last_only)
    hidden_states: torch.Tensor  # [B, S, hidden], after the final layer norm


class GLM(nn.Module):
    """The causal LM: GLMTransformer plus the (tied) output projection."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = GLMTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_output()
        self._retained_kv: RetainedKV | None = None

    def tie_output(self) -> None:
        """Point the output layer at the embedding table again (after loading or swapping the table)."""
        embedding = self.transformer.word_embeddings
        if hasattr(embedding, "output_layer"):  # an INT8 table (glmkit.quant.quantize): a layer over its buffers
            self.lm_head = embedding.output_layer()
        else:
            self.lm_head.weight = embedding.weight

    @property
    def special_ids(self) -> SpecialIds:
        c = self.config
        return SpecialIds(bos=c.bos_token_id, mask=c.mask_token_id, gmask=c.gmask_token_id, pad=c.pad_token_id)

    @property
    def position_layout(self) -> PositionLayout:
        """How this model's family derives positions and masks from token ids."""
        return LAYOUTS[self.config.position_layout]

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the embedding table may be stored as int8): the norms'."""
        norms = (self.transformer.final_layernorm, *(layer.input_layernorm for layer in self.transformer.layers))
        return next(p.dtype for n in norms for p in n.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache_position: CachePosition = None,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, S]. Without positions and mask, they are derived from the ids exactly as the
        official model does (pads count as context). With a KV cache set up, `cache_position` is where
        these tokens go in it, and positions must be given for anything but the first chunk."""
        hidden = self.hidden_states(input_ids, position_ids, attention_mask, cache_position=cache_position)
        selected = hidden[:, -1:] if last_only else hidden
        # As 2D rows: a strided 3D slice sends F.linear down a batched path that copies the whole
        # (1 GB at ChatGLM-6B's vocabulary) output table, measured at 6 s per prompt in bf16.
        logits = self.lm_head(selected.reshape(-1, selected.shape[-1])).view(*selected.shape[:-1], -1)
        return CausalLMOutput(logits=logits, hidden_states=hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache_position: CachePosition = None,
    ) -> torch.Tensor:
        """The final norm's output [B, S, hidden] for `forward`'s arguments, without the output layer: what pools
        into embeddings (glmkit.generation.embed), which need no vocabulary-wide product."""
        if position_ids is None:
            if cache_position:
                raise ValueError("position_ids are required when continuing from a KV cache")
            position_ids, derived_mask = model_layout(input_ids, self.special_ids, self.position_layout)
            attention_mask = derived_mask if attention_mask is None else attention_mask
        start = int(cache_position.max()) if isinstance(cache_position, torch.Tensor) else cache_position or 0
        self.check_length(start, input_ids.shape[1])
        return self.transformer(input_ids, position_ids, attention_mask, cache_position)

    def check_length(self, start: int, count: int) -> None:
        end = start + count
        if end > self.config.max_sequence_length:
            raise ValueError(
                f"sequence of {end} tokens exceeds the model's context (max_sequence_length "
                f"{self.config.max_sequence_length}); shorten the prompt or the history"
            )

    def setup_kv_cache(self, batch_size: int, max_length: int) -> None:
        """Allocate every layer's cache once, so decoding never reallocates (for the layer's own heads:
        under tensor parallelism, the rank's share). Drops a retained cache (retain_kv_cache)."""
        c = self.config
        self._retained_kv = None
        for layer in self.transformer.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, max_length, layer.attention.num_kv_heads, c.head_dim, self.dtype, self.device
            )

    def setup_paged_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> None:
        """Give every layer its share of a pool of `num_blocks` blocks (glmkit.models.paged), in `dtype` (default:
        the activations'); the engine decides which blocks each request uses. Drops a retained cache."""
        c = self.config
        self._retained_kv = None
        for layer in self.transformer.layers:
            layer.attention.kv_cache = PagedKVCache(num_blocks, block_size, layer.attention.num_kv_heads, c.head_dim,
                                                    dtype or self.dtype, self.device)

    def zero_kv_blocks(self, blocks: Sequence[int]) -> None:
        """Zero these blocks of every layer's pool (the engine hands them to a request)."""
        index = torch.tensor(list(blocks), dtype=torch.long, device=self.device)
        for layer in self.transformer.layers:
            layer.attention.kv_cache.zero_blocks(index)

    def copy_kv_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy (source, destination) blocks in every layer's pool."""
        src, dst = (torch.tensor(list(side), dtype=torch.long, device=self.device) for side in zip(*pairs, strict=True))
        for layer in self.transformer.layers:
            layer.attention.kv_cache.copy_blocks(src, dst)

    def paged_hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, step: PagedStep) -> torch.Tensor:
        """The final norm's output [N, hidden] for one flat step of the paged cache: input_ids [N] of several
        requests, position_ids [P, N] (each token's own), `step` saying where each token's keys go and what each
        attends to. The engine checks each request's length against the context itself."""
        return self.transformer(input_ids[None], position_ids[None], None, step)[0]

    def select_kv_cache_rows(self, rows: torch.Tensor, length: int) -> None:
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):
            return  # every beam extends itself: nothing moves
        for layer in self.transformer.layers:
            layer.attention.kv_cache.select_rows(rows, length)

    def clear_kv_cache(self) -> None:
        """Free the caches, a retained one (retain_kv_cache) included."""
        self._retained_kv = None
        for layer in self.transformer.layers:
            layer.attention.kv_cache = None

    def retain_kv_cache(self, ids: Sequence[int]) -> None:
        """End a one-row generation whose caches hold `ids` (slots 0..len(ids)-1) like clear_kv_cache, but keep
        the caches aside for resume_kv_cache. Anything else (no cache, several rows, a non-causal layout) clears."""
        caches = [layer.attention.kv_cache for layer in self.transformer.layers]
        self.clear_kv_cache()
        if (self.position_layout.name == "causal" and ids and all(c is not None for c in caches)
                and caches[0].k.shape[0] == 1 and len(ids) <= caches[0].k.shape[2]):
            self._retained_kv = RetainedKV(tuple(ids), caches)

    def resume_kv_cache(self, ids: Sequence[int], max_length: int) -> int:
        """Set up a one-row cache of at least `max_length` slots for a sequence starting with `ids`, reusing the
        retained caches over the longest prefix `ids` shares with theirs (at most len(ids) - 1: the last id is fed
        again for its logits). Returns how many leading ids the cache already holds; 0: a fresh cache."""
        kept = self.__dict__.get("_retained_kv")
        reused = 0
        if kept is not None and self.position_layout.name == "causal" and kept.matches(self.dtype, self.device):
            reused = min(kept.common_prefix(ids), len(ids) - 1)
        if reused <= 0:
            self.setup_kv_cache(1, max_length)
            return 0
        self._retained_kv = None
        for layer, cache in zip(self.transformer.layers, kept.caches, strict=True):
            layer.attention.kv_cache = cache if cache.k.shape[2] >= max_length else cache.grown(max_length, reused)
        return reused
