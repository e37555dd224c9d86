"""Weight-only INT8/INT4 quantization of the four linears of each block, and optionally INT8 embeddings.

One on-disk format, the official one (THUDM/chatglm-6b-int4, -int8), generalised to groups:
- `<linear>.weight` is int8. INT8 holds one value per weight; INT4 packs two per byte, the high
  nibble holding the even column: `byte = (w[2j] << 4) | (w[2j+1] & 0xF)`.
- `<linear>.weight_scale` is symmetric: `w ~= q * scale`, scale = absmax / 127 (INT8) or / 7 (INT4).
  Shape [out] is one scale per row, the official layout; [out, in / group] is one per group of
  `quantization_group_size` input columns, glmkit's INT4 default (per-row INT4 loses too much).
So an official checkpoint is the special case of a single group per row, and loads with the same code.

On CPU the matmul runs in glmkit's native kernels (`glmkit/quant/kernels`: integer dot products on the
stored official bytes, so one copy of the weights). Where they cannot run (no compiler, no AVX2, a
shape not in blocks of 64) it uses PyTorch's weight-only ops (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`); anywhere else (CUDA included) the layer dequantizes its weight on the
fly, which is correct everywhere and saves memory, not time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.models.modules import replace_module
from glmkit.models.names import BLOCK_LINEARS, in_block
from glmkit.quant import kernels

QUANTIZED_LINEARS = tuple(linear.attr for linear in BLOCK_LINEARS)
BITS = (4, 8)
DEFAULT_INT4_GROUP = 128
# With fp32 activations the CPU kernels are slow for prompts, and unpacking the weight once for one
# dense matmul wins above a few rows. With bf16 activations the kernels win at every size. Measured on
# a 2-core AVX2 CPU, one 16384x4096 layer, 512 rows: INT4 kernel bf16 1.24 s, dequantize + fp32
# matmul 1.0 s, dequantize + bf16 matmul 3.8 s; 1 row: kernel bf16 9 ms, kernel fp32 73 ms.
DENSE_ABOVE_ROWS = 16


def max_level(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # 127 or 7: symmetric, as the official format


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 0,
                    reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q int8 in [-max, max] of the weight's shape; scale [out] (group 0) or [out, in/group].

    `reduce_absmax` combines the absmax with the rest of the row held elsewhere (tensor parallelism)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    out_features, in_features = weight.shape
    group = group_size or in_features
    if in_features % group:
        raise ValueError(f"quantization group size {group} does not divide the input size {in_features}")
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    absmax = w.abs().amax(dim=-1)  # [out, groups]
    scale = (reduce_absmax(absmax) if reduce_absmax else absmax) / max_level(bits)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-max_level(bits), max_level(bits)).to(torch.int8)
    return q.reshape(out_features, in_features), scale if group_size else scale.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] int8 values in [-8, 7] -> [out, in/2] int8, even column in the high nibble."""
    return ((q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4; arithmetic shifts on int8 restore the signs."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


def cpu_kernel_int4_pack(stored: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """The CPU kernel's packing of an official INT4 weight [out, in/2], a block of rows at a time.

    The kernel takes unsigned nibbles as int32, 8 bytes per weight: whole, a 16384 x 4096 layer
    would need a 0.5 GB transient. Its tiles are 32 or 64 rows, so blocks of 1024 rows pack alike.
    The kernel's asymmetric form is w = (u - 8) * scale + zero with u in [0, 15]; ours has zero = 0."""
    blocks = []
    for start in range(0, stored.shape[0], rows_per_chunk):
        unsigned = unpack_int4(stored[start:start + rows_per_chunk]).to(torch.int32)
        unsigned += 8
        blocks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1))
    return torch.cat(blocks)


def kernel_int4_values(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu`: int8 values [out, in] in [-8, 7].

    The CPU packing is a tiled layout that PyTorch does not document (and may tile differently per
    CPU), so it is learned, not assumed: packing the base-16 digits of every element's index shows
    which element each output nibble holds. Used only to save a layer whose stored copy was freed."""
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int64).reshape(out_features, in_features)
    low = torch.zeros(packed.shape, dtype=torch.int64)
    high = torch.zeros(packed.shape, dtype=torch.int64)
    digit = 0
    while 16 ** digit < count:
        plane = ((index >> (4 * digit)) & 0xF).to(torch.int32).contiguous()
        nibbles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(plane, 1).to(torch.int64)
        low |= (nibbles & 0xF) << (4 * digit)
        high |= ((nibbles >> 4) & 0xF) << (4 * digit)
        digit += 1
    unsigned = torch.empty(count, dtype=torch.int8)
    data = packed.cpu().to(torch.int32)
    unsigned[low.flatten()] = (data & 0xF).flatten().to(torch.int8)
    unsigned[high.flatten()] = ((data >> 4) & 0xF).flatten().to(torch.int8)
    return (unsigned - 8).reshape(out_features, in_features)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight from int8 values [out, in] and scales [out] or [out, groups]."""
    out_features, in_features = q.shape
    scale = scale.float().reshape(out_features, -1, 1)
    return (q.float().reshape(out_features, scale.shape[1], -1) * scale).reshape(out_features, in_features)


# How quantized layers multiply (`use_kernels`): "native", glmkit's kernels, which round activations to int8 per
# 64 columns (fastest); "exact", float activations through PyTorch's weight-only ops, the dequantized weights'
# numbers, which is what the official INT4/INT8 code computes.
KERNELS = ("native", "exact")


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored as int8 (INT8) or packed int4 (INT4) with symmetric scales.

    The state dict holds exactly the official keys (weight, weight_scale, bias); the kernel's own
    packing, which depends on the device, is derived once on first use and never saved."""

    exact: bool = False  # float activations only (use_kernels(model, "exact")): never the native kernels

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        stored_in = in_features // 2 if bits == 4 else in_features
        scale_shape = (out_features, in_features // group_size) if group_size else (out_features,)
        self.register_buffer("weight", torch.empty(out_features, stored_in, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._kernel: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0,
                    reduce_absmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> QuantizedLinear:
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, group_size, linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)
        q, scale = quantize_weight(weight, bits, group_size, reduce_absmax)
        layer.weight = pack_int4(q) if bits == 4 else q
        layer.weight_scale = scale.to(weight.dtype)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def int_values(self) -> torch.Tensor:
        return unpack_int4(self.weight) if self.bits == 4 else self.weight

    def __getattr__(self, name: str):
        # An INT4 layer that runs in the CPU kernel with bf16 activations frees its stored (official)
        # copy: the kernel's packing alone serves every row count. Anything that asks for `weight`
        # gets it back, rebuilt from that packing.
        if name == "weight" and self.__dict__.get("_buffers", {}).get("weight", 0) is None:
            self._buffers["weight"] = self._stored_from_kernel()
        return super().__getattr__(name)

    def _stored_from_kernel(self) -> torch.Tensor:
        """The official packed int8 weight, rebuilt from the kernel's copy."""
        _, packed, *_ = self._kernel
        return pack_int4(kernel_int4_values(packed, self.out_features, self.in_features)).to(packed.device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._buffers.get("weight", 0) is None:  # saved from the kernel's copy, not kept
            destination[prefix + "weight"] = self._stored_from_kernel()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.int_values(), self.weight_scale)

    def _apply(self, fn, recurse=True):  # moving or casting the layer invalidates the kernel packing
        self.int_values()  # brings back a freed stored copy first
        self._kernel = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and flat.requires_grad:  # training adapters on a frozen quantized base
            out = _FrozenQuantizedMatmul.apply(flat, self)
        else:
            out = self._matmul(flat)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] @ W^T, by the fastest path for x's dtype and rows."""
        prepared = self._kernel[0] if self._kernel is not None and self._kernel[-1] == x.dtype else None
        if prepared == "native" or prepared is None and self._native_kernel_serves(x):
            return self._native_matmul(x)
        if x.shape[0] > DENSE_ABOVE_ROWS and x.dtype != torch.bfloat16:
            kind = "dequantize"  # decided before packing: prompts and training never build the kernel's copy
        else:
            if self._kernel is None or self._kernel[-1] != x.dtype:
                self._kernel = self._prepare_kernel(x)
            kind = self._kernel[0]
        if kind == "int8":
            out = torch.ops.aten._weight_int8pack_mm(x, self.weight, self._kernel[1])
        elif kind == "int4":
            _, packed, group, scales_and_zeros, _ = self._kernel
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
        else:
            out = F.linear(x, self.dequantized_weight().to(x.dtype))
        return out

    def _native_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None or self._kernel[0] != "native" or self._kernel[-1] != x.dtype:  # scales once
            scales = self.weight_scale
            self._kernel = ("native", scales if scales.dtype in (torch.float32, torch.bfloat16) else scales.float(),
                            x.dtype)
        matmul = kernels.int4_matmul if self.bits == 4 else kernels.int8_matmul
        return matmul(x, self.weight, self._kernel[1]).to(x.dtype)

    def _native_kernel_serves(self, x: torch.Tensor) -> bool:
        return (not self.exact and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and kernels.supports(self.in_features, self.group_size, self.bits) and kernels.available())

    def _prepare_kernel(self, x: torch.Tensor) -> tuple:
        """The fastest path for activations like x, as (kind, *its tensors, x.dtype); scales are
        converted to x's dtype once here rather than on every call."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return ("dequantize", x.dtype)
        if self.bits == 8 and not self.group_size:
            return ("int8", self.weight_scale.to(x.dtype), x.dtype)
        if self.bits == 4:
            group = self.group_size or DEFAULT_INT4_GROUP
            if self.in_features % group or self.out_features % 16:  # the CPU packing needs rows in 16s
                return ("dequantize", x.dtype)
            scale = self.weight_scale.float()
            if not self.group_size:  # one scale per row (official), replicated over the kernel's groups
                scale = scale[:, None].expand(-1, self.in_features // group)
            packed = cpu_kernel_int4_pack(self.weight)
            scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1).transpose(0, 1).contiguous()
            if x.dtype == torch.bfloat16:  # the kernel serves every row count: one copy is enough
                self._buffers["weight"] = None
            return ("int4", packed, group, scales_and_zeros.to(x.dtype), x.dtype)
        return ("dequantize", x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W^T with W quantized and frozen: the gradient flows to x only. Backward dequantizes the
    weight for the moment it needs it, so no full-precision copy outlives the step (what keeps LoRA
    on a quantized base near the quantized model's memory)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


EMBEDDING_INT4_GROUP = 128  # INT4 embedding rows: one scale per 128 columns (per row if the width is not a multiple)


def embedding_group(bits: int, embedding_dim: int) -> int:
    """The scale group of an INT8/INT4 embedding table: per row for INT8, 128 columns for INT4."""
    return EMBEDDING_INT4_GROUP if bits == 4 and embedding_dim % EMBEDDING_INT4_GROUP == 0 else 0


def embedding_bits(value: bool | int | None) -> int:
    """`quantize_embeddings` as bits: True means INT8 (the first form of the option), False/None 0."""
    bits = 8 if value is True else int(value or 0)
    if bits not in (0, *BITS):
        raise ValueError(f"embedding quantization must be 4 or 8 bits, not {value!r}")
    return bits


class QuantizedEmbedding(nn.Module):
    """The word embedding as INT8 rows with one scale per token, or INT4 rows (official nibble
    packing) with one scale per 128 columns (`weight`, `weight_scale`).

    At the ChatGLM-6B shape the 130528 x 4096 table is 2.1 GB in fp32, more than all INT4 blocks
    together; INT8 makes it 0.53 GB and INT4 0.28 GB. A tied output layer is a QuantizedLinear over
    the same two buffers (`output_layer`), so the table is stored once and the logits use the
    integer kernels; decoding reads the whole table once per token, so its size is speed too."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, bits: int = 8) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.group_size = embedding_group(bits, embedding_dim)
        stored = embedding_dim // 2 if bits == 4 else embedding_dim
        scale_shape = (num_embeddings, embedding_dim // self.group_size) if self.group_size else (num_embeddings,)
        self.register_buffer("weight", torch.empty(num_embeddings, stored, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 8) -> QuantizedEmbedding:
        weight = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, dtype=weight.dtype, device=weight.device,
                    bits=bits)
        q, scale = quantize_weight(weight, bits, layer.group_size)
        layer.weight = pack_int4(q) if bits == 4 else q
        layer.weight_scale = scale.to(weight.dtype)
        return layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> [..., hidden] in the scales' dtype: only the looked-up rows are dequantized."""
        flat = input_ids.reshape(-1)
        rows = self.weight[flat]
        values = unpack_int4(rows) if self.bits == 4 else rows
        out = dequantize(values, self.weight_scale[flat]).to(self.weight_scale.dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def output_layer(self) -> QuantizedLinear:
        """hidden -> vocabulary logits over this table's buffers (tied output weights)."""
        layer = QuantizedLinear(self.embedding_dim, self.num_embeddings, self.bits, self.group_size, bias=False,
                                dtype=self.weight_scale.dtype, device=self.weight.device)
        layer.weight, layer.weight_scale = self.weight, self.weight_scale
        return layer

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}"


def quantize_embeddings(model: nn.Module, bits: int = 8) -> nn.Module:
    """INT8/INT4 word embedding in place, and the output layer with it (tied: the same buffers)."""
    embedding = model.transformer.word_embeddings
    if isinstance(embedding, nn.Embedding):
        model.transformer.word_embeddings = QuantizedEmbedding.from_embedding(embedding, bits)
    if model.config.tie_word_embeddings:
        model.tie_output()
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = QuantizedLinear.from_linear(model.lm_head, bits, embedding_group(bits, model.lm_head.in_features))
    model.config.quantization_embedding_bit = bits
    return model


def quantized_embedding_layout(model: nn.Module, dtype: torch.dtype, bits: int = 8) -> nn.Module:
    """Empty INT8/INT4 embedding (and output) layers, for loading a checkpoint saved with them."""
    embedding = model.transformer.word_embeddings
    device = embedding.weight.device
    model.transformer.word_embeddings = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim,
                                                           dtype=dtype, device=device, bits=bits)
    if model.config.tie_word_embeddings:
        model.tie_output()
    else:
        head = model.lm_head
        model.lm_head = QuantizedLinear(head.in_features, head.out_features, bits, embedding_group(bits, head.in_features),
                                        bias=False, dtype=dtype, device=device)
    return model


def use_kernels(model: nn.Module, kind: str) -> nn.Module:
    """Pick how the model's quantized layers multiply, one of KERNELS (a model without them is unchanged)."""
    if kind not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kind!r}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.int_values()  # brings back a stored copy a kernel packing replaced, before dropping that packing
            module.exact = kind == "exact"
            module._kernel = None
    return model


def block_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every quantizable linear inside the blocks."""
    for name, module in list(model.named_modules()):
        if not in_block(name):
            continue
        for attr in QUANTIZED_LINEARS:
            child = getattr(module, attr, None)
            if isinstance(child, nn.Linear | QuantizedLinear):
                yield module, attr, child


def default_group(bits: int) -> int:
    return DEFAULT_INT4_GROUP if bits == 4 else 0


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None) -> nn.Module:
    """Replace the block linears by QuantizedLinear in place; records the choice in model.config."""
    group = default_group(bits) if group_size is None else group_size
    for parent, attr, child in block_linears(model):
        if isinstance(child, nn.Linear):
            replace_module(parent, attr, QuantizedLinear.from_linear(child, bits, group_for(child.in_features, group)))
    record_quantization(model, bits, group)
    return model


def quantized_layout(model: nn.Module, bits: int, group_size: int, dtype: torch.dtype) -> nn.Module:
    """Empty QuantizedLinear layers in place of the block linears, for loading a quantized checkpoint."""
    for parent, attr, child in block_linears(model):
        if isinstance(child, nn.Linear):
            layer = QuantizedLinear(child.in_features, child.out_features, bits,
                                    group_for(child.in_features, group_size), child.bias is not None, dtype=dtype,
                                    device=child.weight.device)
            replace_module(parent, attr, layer)
    record_quantization(model, bits, group_size)
    return model


def record_quantization(model: nn.Module, bits: int, group_size: int) -> None:
    """Note the quantization in model.config, so that save_pretrained writes it to config.json."""
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_bit, config.quantization_group_size = bits, group_size


def group_for(in_features: int, group: int) -> int:
    """The requested group if it divides the layer, else one scale per row (the official layout)."""
    return group if group and in_features % group == 0 else 0
