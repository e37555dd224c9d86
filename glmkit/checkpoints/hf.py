"""Reading and writing model directories in the official Hugging Face layout.

A model directory holds `config.json` and weights as one of
    pytorch_model.bin | pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json
    model.safetensors | model-0000N-of-0000M.safetensors + model.safetensors.index.json
(fp16, bf16 or fp32 on disk), and usually the tokenizer (`ice_text.model`, `tokenizer_config.json`).

Loading builds the model on the meta device and fills it shard by shard, converting each tensor to
the requested dtype as it goes, so peak memory stays near one copy of the model plus one shard
(memory-mapped where the format allows). Every way a download can go wrong is checked and reported
with what to do about it, before a half-filled model can be used.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from glmkit import families
from glmkit.checkpoints import sat
from glmkit.checkpoints.files import (  # the shared helpers, also importable from here as before
    BIN_INDEX,
    BIN_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    CheckpointError,
    first_sentence,
    load_torch_file,
    parse_size,
    plan_shards,
    release_freed_memory,
    remove_old_weights,
    write_weights,
)
from glmkit.checkpoints.files import TORCH_DTYPES as DTYPES
from glmkit.families import Family, chatglm2
from glmkit.models import names
from glmkit.models.config import ConfigError, GLMConfig, read_json
from glmkit.models.glm import GLM
from glmkit.models.modules import replace_module
from glmkit.parallel import tp as tp_lib
from glmkit.parallel.layout import kv_heads_per_rank, shard_dim
from glmkit.quant.quantize import (
    QUANTIZED_LINEARS,
    QuantizedLinear,
    default_group,
    group_for,
    quantized_embedding_layout,
    quantized_layout,
    record_quantization,
)
from glmkit.quant.quantize import embedding_bits as quantize_embedding_bits
from glmkit.quant.quantize import quantize_embeddings as quantize_embeddings_in_place

SAFE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8,
               "I64": torch.int64, "I32": torch.int32}
TP_SIZE_KEY = "tensor_parallel_size"  # config.json key of a checkpoint saved as per-rank files
# The NaN/Inf check at load reads tensors in slices of this many elements. Each slice's mask (64 KiB) stays below
# glibc's mmap threshold, so the masks reuse one heap block: 1 MiB masks came and went through mmap, which raised
# the threshold and left the loaded weights fragmenting the heap (loading a 609 MiB model grew RSS by 835 MiB).
FINITE_CHECK_ELEMENTS = 1 << 16


def resolve_dtype(dtype: str | torch.dtype | None, config: GLMConfig, device: torch.device) -> torch.dtype:
    """None means: float32 on CPU (fp16 matmuls are slow or missing there), the checkpoint's dtype on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return DTYPES[config.torch_dtype] if device.type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_config(directory: Path) -> GLMConfig:
    if not directory.exists():
        raise FileNotFoundError(f"model directory {directory} does not exist; pass the folder that holds config.json")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the model directory that contains it")
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} has no config.json; is it a ChatGLM model directory?")
    path = directory / "config.json"
    data = read_json(path)
    try:
        return families.detect(data).config(data, directory)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from e


def weight_files(directory: Path) -> list[Path]:
    """The shard files to read, in order; checks that every shard named by an index is present."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid index file ({e}); re-download it") from e
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).exists()]
            if missing:
                raise CheckpointError(
                    f"{directory} is incomplete: {', '.join(missing)} listed in {index_name} "
                    f"{'is' if len(missing) == 1 else 'are'} missing; download the missing shard(s)"
                )
            return [directory / n for n in names]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (directory / single).exists():
            return [directory / single]
    per_rank = sorted(directory.glob("model-tp*-of-*.safetensors"))  # glmkit reshard's layout
    if per_rank:
        return per_rank
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one shard, memory-mapped where possible."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        else:
            yield from _state_dict(path, load_torch_file(path)).items()
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: it is truncated or corrupt ({first_sentence(e)}); "
                              "re-download it") from e


def _state_dict(path: Path, data: object) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict) or not all(isinstance(t, torch.Tensor) for t in data.values()):
        raise CheckpointError(f"{path} is not a weight file: it holds a {type(data).__name__}, not a "
                              "{name: tensor} dict")
    return data


def load_weights(model: GLM, directory: Path, dtype: torch.dtype, device: torch.device, progress: bool = True,
                 quantize: tuple[int, int] | None = None, tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
                 reduce_absmax: Callable | None = None, quantize_embeddings: int = 0) -> None:
    """Fill a meta-device model from the directory's shards, one shard at a time.

    With `quantize=(bits, group)`, each block linear is quantized as soon as its weight and bias are
    in, so peak memory stays near the quantized model's size, not the full-precision one's. `tensors`
    replaces reading every file (tensor parallelism passes the rank's slices); `reduce_absmax(module,
    group)` may give a function that completes a per-row absmax held in parts across ranks.
    `quantize_embeddings` (8 or 4 bits) quantizes the embedding (and output) table once it is in."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.tie_word_embeddings
    output = f"{names.OUTPUT}."
    if tied:  # the output layer is the embedding table: stored once, under the embedding's names
        expected = {k: v for k, v in expected.items() if not k.startswith(output)}
    seen: set[str] = set()
    family = families.family_of(model.config)
    for name, tensor in read_all(directory, family, progress) if tensors is None else tensors:
        if tied and name.startswith(output):
            continue
        if name not in expected:
            raise CheckpointError(
                f"{directory} holds {name!r}, which this model does not have; config.json does not match "
                "the weights (or the checkpoint is of another architecture)"
            )
        _assign(model, name, tensor, expected[name], dtype, device)
        seen.add(name)
        if quantize:
            _quantize_if_complete(model, name.rpartition(".")[0], *quantize, reduce_absmax)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory} lacks weights for {shown}; the checkpoint is incomplete")
    if tied:
        model.tie_output()
    if quantize_embeddings:
        quantize_embeddings_in_place(model, quantize_embeddings)
        release_freed_memory()


def read_all(directory: Path, family: Family, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(internal name, tensor) of every weight the family's checkpoint holds and glmkit uses."""
    files = weight_files(directory)
    shards = tqdm(files, desc="loading shards", unit="shard", disable=not progress or len(files) < 2)
    # One stream over every shard: a fused tensor's parts (transformers' q/k/v) may lie in different shards.
    yield from internal_tensors((item for path in shards for item in read_shard(path)), family)


def internal_tensors(tensors: Iterable[tuple[str, torch.Tensor]], family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's (name, tensor) pairs under glmkit's internal names: the one place names are mapped
    on the way in (save_model maps them back on the way out)."""
    yield from family.internal_tensors(tensors)


def _assign(model: GLM, name: str, tensor: torch.Tensor, target: torch.Tensor, dtype, device) -> None:
    shape = target.shape
    if tensor.shape != shape:
        raise CheckpointError(
            f"{name} has shape {tuple(tensor.shape)} in the checkpoint but config.json implies {tuple(shape)}; "
            "config.json does not match the weights"
        )
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:  # quantized weights stay integers; their scales follow the model's dtype
        if target.dtype == torch.int8 and tensor.dtype != torch.int8:
            raise CheckpointError(f"{name} is {tensor.dtype} in the checkpoint, but config.json says it is quantized "
                                  "(quantization_bit); config.json does not match the weights")
        module._buffers[attr] = _finite(name, tensor.to(device=device,
                                                        dtype=target.dtype if target.dtype == torch.int8 else dtype))
        return
    value = _finite(name, tensor.to(device=device, dtype=dtype))
    module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


def _finite_slice(part: torch.Tensor) -> bool:
    """A NaN or Inf makes the slice's sum non-finite, so a finite sum proves there is none: one reduction, no mask
    (5-15x faster than isfinite().all(), measured on 1e8 fp16/bf16 values). A sum that overflows on finite values
    (huge bf16/fp32 weights) is settled by the exact test."""
    return bool(torch.isfinite(part.sum(dtype=torch.float32))) or bool(torch.isfinite(part).all())


def _finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """A weight with NaN or Inf in it would answer garbage (or NaN logits) much later: refuse it here, by name.
    One pass over each tensor as it is assigned, on its device, in slices: no mask the size of the tensor."""
    if value.is_floating_point() and not all(_finite_slice(part)
                                             for part in value.reshape(-1).split(FINITE_CHECK_ELEMENTS)):
        bad = sum(int((~torch.isfinite(part)).sum()) for part in value.reshape(-1).split(FINITE_CHECK_ELEMENTS))
        raise CheckpointError(f"{name} holds {bad} NaN or Inf value(s): the checkpoint is corrupt (or was saved "
                              "from a diverged run); re-download it or use an earlier checkpoint")
    return value


def _quantize_if_complete(model: GLM, module_name: str, bits: int, group: int,
                          reduce_absmax: Callable | None = None, quantize_embeddings: bool = False) -> None:
    attr = module_name.rpartition(".")[2]
    module = model.get_submodule(module_name)
    complete = isinstance(module, torch.nn.Linear) and not any(p.is_meta for p in module.parameters())
    if complete and attr in QUANTIZED_LINEARS and names.in_block(module_name):
        group = group_for(module.in_features, group)
        reduce = reduce_absmax(module_name, group) if reduce_absmax else None
        layer = QuantizedLinear.from_linear(module, bits, group, reduce)
        replace_module(model, module_name, layer)
        del module
        release_freed_memory()


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    model_class: type[GLM] = GLM,
    quantize: int | None = None,
    group_size: int | None = None,
    tp: int = 1,
    quantize_embeddings: bool | int = False,
) -> GLM:
    """A model from a directory in the official layout; `quantize=4|8` quantizes while loading.

    tp > 1: this process is one of `tp` ranks (tp.init has run); it builds its shard on the meta device
    and reads only its slices of the checkpoint, whatever tensor-parallel size it was saved at.
    quantize_embeddings: INT8 (True or 8) or INT4 (4) word embedding and output layer, also without
    `quantize`."""
    directory = Path(path).expanduser()
    config = read_config(directory)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, config, device)
    stored_bits = config.quantization_bit
    if quantize and stored_bits and quantize != stored_bits:
        raise CheckpointError(f"{directory} is already quantized to {stored_bits} bits; it cannot be loaded as "
                              f"{quantize}-bit (quantize the full-precision checkpoint instead)")
    embedding_bits, embeddings_on_load = config.quantization_embedding_bit, quantize_embedding_bits(quantize_embeddings)
    if embedding_bits and embeddings_on_load and embedding_bits != embeddings_on_load:
        raise CheckpointError(f"{directory} stores its embeddings at {embedding_bits} bits; they cannot be loaded as "
                              f"{embeddings_on_load}-bit (quantize the full-precision checkpoint instead)")
    if tp > 1 and (embedding_bits or embeddings_on_load):
        raise tp_lib.TPError("Quantized embeddings are not sharded yet: load a checkpoint with full-precision "
                             "embeddings (glmkit quantize without --embeddings) to use --tp")
    with torch.device("meta"):
        model = model_class(config)
    rank = tp_lib.rank() if tp > 1 else 0
    if tp > 1:
        if config.pre_seq_len:
            raise tp_lib.TPError("P-Tuning v2 prefixes are not sharded; merge or drop the prefix to use --tp")
        tp_lib.apply_tp(model, rank, tp)
    if stored_bits:
        quantized_layout(model, stored_bits, config.quantization_group_size, dtype)
    if embedding_bits:
        quantized_embedding_layout(model, dtype, embedding_bits)
    on_load = None
    if quantize and not stored_bits:
        group = default_group(quantize) if group_size is None else group_size
        on_load = (quantize, group)
    if tp > 1:
        tp_lib.check_quantized_groups(model, *(on_load or (stored_bits, config.quantization_group_size)), tp)
    plain = stored_tp_size(config) == 1 and not (directory / "latest").is_file()
    tensors = None if tp == 1 and plain else local_tensors(directory, config, rank, tp)
    load_weights(model, directory, dtype, device, progress, quantize=on_load, tensors=tensors,
                 reduce_absmax=tp_lib.row_absmax_reducer if tp > 1 else None,
                 quantize_embeddings=0 if embedding_bits else embeddings_on_load)
    if on_load:
        record_quantization(model, *on_load)
    model.name_or_path = str(directory)
    return model.eval()


def stored_tp_size(config: GLMConfig) -> int:
    """How many per-rank files the checkpoint is split into (`glmkit reshard`); 1 for the usual layout."""
    return int(config.extra.get(TP_SIZE_KEY, 1))


def tp_file(rank: int, size: int) -> str:
    return f"model-tp{rank:02d}-of-{size:02d}.safetensors"


def local_tensors(directory: Path, config: GLMConfig, rank: int, world: int,
                  for_compute: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank `rank` of `world`'s slice of every tensor, from a checkpoint saved over S per-rank files.

    Files are memory-mapped and sliced before anything is copied, so a rank reads only its part. With
    S a multiple of the world size a rank merges its S / world files; with the world size a multiple of
    S it splits its one file further; an unsharded checkpoint is S = 1, an official SwissArmyTransformer
    one (`latest`, mp_rank_XX files, next to a config.json) S = its model-parallel size. `for_compute`: row-parallel
    biases are zeros on ranks > 0 (the all-reduce adds rank 0's); on disk every rank keeps them."""
    sources = _rank_sources(directory, stored_tp_size(config))
    family = families.family_of(config)
    stored = len(sources)
    if stored % world and world % stored:
        raise CheckpointError(f"{directory} is sharded for {stored} tensor-parallel ranks, which cannot be loaded at "
                              f"--tp {world}; run: glmkit reshard {directory} NEW_DIR --tp {world}")
    if stored >= world:
        per = stored // world
        maps = [dict(_mapped(files, family)) for files in sources[rank * per:(rank + 1) * per]]
        for name in list(maps[0]):
            merged = tp_lib.merge_local(name, [m.pop(name) for m in maps], config)
            yield name, tp_lib.split_local(name, merged, rank if for_compute else 0, 0, 1, config).clone()
        return
    per = world // stored
    for name, tensor in _mapped(sources[rank // per], family):
        yield name, tp_lib.split_local(name, tensor, rank if for_compute else 0, rank % per, per, config).clone()


def _rank_sources(directory: Path, stored: int) -> list[list[Path]]:
    """The files of each stored rank: one per rank for a resharded or SAT checkpoint, all of them otherwise."""
    if (directory / "latest").is_file():
        return [[f] for f in sat.rank_files(sat.iteration_directory(directory))]
    if stored == 1:
        return [weight_files(directory)]
    files = [directory / tp_file(r, stored) for r in range(stored)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory} lacks {', '.join(missing)} (config.json says {TP_SIZE_KEY} {stored}); "
                              "copy the missing per-rank files or reshard the original again")
    return [[f] for f in files]


def _mapped(files: list[Path], family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    """(internal name, tensor) memory-mapped, nothing read until a slice is copied (.bin pickles: torch's
    mmap). Buffers glmkit recomputes are skipped here: they have no tensor-parallel layout."""
    yield from internal_tensors((item for path in files for item in _mapped_file(path)), family)


def _mapped_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".pt":  # a SAT rank file
        yield from sat.load_rank(path).items()
    elif path.suffix != ".safetensors":
        yield from read_shard(path)
    else:
        start = 8 + int.from_bytes(path.open("rb").read(8), "little")
        with path.open("rb") as f:
            for name, meta in _header(path).items():
                yield name, _map_tensor(f, path, name, meta, start)


def _map_tensor(f, path: Path, name: str, meta: dict, data_start: int) -> torch.Tensor:
    """One tensor of a safetensors file in a mapping of its own: the pages a rank touched while copying
    its slice leave its memory with the tensor, instead of adding up over the whole file."""
    dtype = SAFE_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: {name} has dtype {meta['dtype']}, which glmkit does not load")
    begin, end = (data_start + offset for offset in meta["data_offsets"])
    if end == begin:
        return torch.empty(meta["shape"], dtype=dtype)
    aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
    memory = mmap.mmap(f.fileno(), end - aligned, offset=aligned, access=mmap.ACCESS_COPY)  # private: writable
    if hasattr(memory, "madvise"):  # no read-ahead: it would pull in the other ranks' slices too
        memory.madvise(mmap.MADV_RANDOM)
    flat = torch.frombuffer(memory, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin - aligned)
    return flat.view(meta["shape"])


def save_model(
    model: GLM,
    path: str | Path,
    *,
    safe_serialization: bool = True,
    max_shard_size: int | str = "2GB",
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write config.json and the weights in the official layout (safetensors by default).

    Tied output weights are not stored twice: HF (and the official code through it) re-ties them."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    remove_old_weights(directory)
    target = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype] if dtype else model.dtype
    family = families.family_of(model.config)
    internal = (
        (name, t.detach().to(device="cpu", dtype=target if t.is_floating_point() else t.dtype))
        for name, t in model.state_dict().items()
        if not (model.config.tie_word_embeddings and name.startswith(f"{names.OUTPUT}."))
    )
    state = {name: t.contiguous() for name, t in family.checkpoint_tensors(internal, model.config)}
    plan = plan_shards({k: t.numel() * t.element_size() for k, t in state.items()}, parse_size(max_shard_size))
    write_weights(directory, plan, state.__getitem__, safe_serialization)
    config = dataclasses.replace(model.config, torch_dtype=str(target).removeprefix("torch."))
    write_config(config, directory, family)
    source = getattr(model, "name_or_path", None)
    if source:
        copy_tokenizer(Path(source), directory, family)
    return directory


def write_config(config: GLMConfig, directory: Path, family: Family) -> None:
    """config.json in the family's own keys (THUDM's, transformers', or glmkit's for ChatGLM-6B)."""
    text = json.dumps(family.config_json(config), indent=2, ensure_ascii=False) + "\n"
    (Path(directory) / "config.json").write_text(text, encoding="utf-8")


def copy_tokenizer(source: Path, directory: Path, family: Family) -> None:
    """A saved model directory should be usable alone, so the tokenizer travels with the weights."""
    if source.resolve() == directory.resolve():
        return
    for name in family.tokenizer_files:
        if (source / name).exists():
            shutil.copyfile(source / name, directory / name)


def describe(path: str | Path) -> dict:
    """Facts about a model directory, read from headers only (nothing is materialised)."""
    directory = Path(path).expanduser()
    config = read_config(directory)
    files = weight_files(directory)
    tp = stored_tp_size(config)
    per_rank = tp > 1
    family = families.family_of(config)
    count, dtypes, seen = 0, set(), set()
    for file in files:
        rank = _file_rank(file)
        if file.suffix == ".safetensors":
            verify_safetensors(file)
        for stored_name, shape, dtype in _tensor_headers(file):
            name = family.internal_name(stored_name)
            if name.endswith(".weight_scale"):
                continue  # quantization metadata, not parameters
            if per_rank and name in seen and _replicated(name):
                continue  # every rank's file holds a whole copy: one parameter set, not N
            seen.add(name)
            bits = config.quantization_bit if names.in_block(name) else config.quantization_embedding_bit
            packed = bits == 4 and "int8" in dtype.lower() and name.endswith(".weight")
            numel = _numel(shape) - (_replicated_kv_numel(name, shape, config, rank, tp) if per_rank else 0)
            count += numel * (2 if packed else 1)  # INT4 packs two weights per byte
            dtypes.add(dtype)
    return {
        "path": str(directory),
        "family": chatglm2.variant(config.to_dict(), directory) if family is chatglm2.FAMILY else family.name,
        "config": config.to_dict(),
        "parameters": count,
        "dtype_on_disk": sorted(dtypes),
        "weight_files": [f.name for f in files],
        "size_on_disk_bytes": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()),
        "tokenizer": (directory / family.tokenizer_files[0]).exists(),
        "tokenizer_file": family.tokenizer_files[0],
    }


def _file_rank(file: Path) -> int:
    """The rank of a per-rank file (tp_file's name); 0 for any other file."""
    found = re.fullmatch(r"model-tp(\d+)-of-\d+\.safetensors", file.name)
    return int(found.group(1)) if found else 0


def _replicated_kv_numel(name: str, shape, config: GLMConfig, rank: int, tp: int) -> int:
    """The elements of a per-rank grouped QKV that another rank's file holds too: with more ranks than KV heads,
    each KV head is copied to the tp / g ranks whose query heads read it (parallel.layout), so only the first of
    them counts its K and V rows."""
    if config.multi_query_group_num is None or names.block_linear(name) != names.QKV or config.kv_heads % tp == 0:
        return 0
    copies = tp // config.kv_heads  # ranks holding the same KV head
    if rank % copies == 0:
        return 0
    kv_rows = 2 * kv_heads_per_rank(config.kv_heads, tp) * config.head_dim
    return _numel(shape) // shape[0] * kv_rows


def _replicated(name: str) -> bool:
    try:
        return shard_dim(name) is None
    except ValueError:  # no known layout: counted as a slice
        return False


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tensor_headers(path: Path) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) per tensor; safetensors from its header, .bin via a memory map."""
    if path.suffix != ".safetensors":
        for name, tensor in read_shard(path):
            yield name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
        return
    header = _header(path)
    for name, meta in header.items():
        yield name, tuple(meta["shape"]), str(SAFE_DTYPES.get(meta["dtype"], meta["dtype"].lower())).removeprefix("torch.")


# Bytes per element of the safetensors dtypes, to check each tensor's extent against its shape.
SAFE_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def verify_safetensors(path: Path) -> None:
    """The file holds every byte its header describes, each tensor exactly its shape's (a truncated download,
    or a corrupt header): what safetensors checks when it opens a file, done from the header alone."""
    header, data_start = _header(path), 8 + int.from_bytes(path.open("rb").read(8), "little")
    size, end = path.stat().st_size, data_start
    for name, meta in header.items():
        begin, stop = meta["data_offsets"]
        itemsize = SAFE_ITEMSIZE.get(meta["dtype"])
        if not 0 <= begin <= stop or (itemsize and stop - begin != _numel(meta["shape"]) * itemsize):
            raise CheckpointError(f"{path} is corrupt: {name}'s bytes {begin}..{stop} do not hold its shape "
                                  f"{tuple(meta['shape'])} of {meta['dtype']}; re-download it")
        end = max(end, data_start + stop)
    if size < end:
        raise CheckpointError(f"{path} is truncated: it has {size:,} bytes, its header describes {end:,}; "
                              "re-download it")
    if size > end:
        raise CheckpointError(f"{path} is corrupt: {size - end:,} bytes after the last tensor its header describes; "
                              "re-download it")


def _header(path: Path) -> dict:
    """A safetensors file's tensor table: name -> {dtype, shape, data_offsets}."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated: {size:,} bytes, too short for its own header; re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: corrupt safetensors header ({e}); re-download it") from e
    if not isinstance(header, dict) or not all(
            isinstance(m, dict) and {"dtype", "shape", "data_offsets"} <= set(m)
            for k, m in header.items() if k != "__metadata__"):
        raise CheckpointError(f"cannot read {path}: corrupt safetensors header (not a tensor table); re-download it")
    header.pop("__metadata__", None)
    return header
