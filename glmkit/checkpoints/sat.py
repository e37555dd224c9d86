"""Official GLM-130B checkpoints (SwissArmyTransformer layout) to glmkit model directories.

    SRC/latest                                  the iteration, e.g. "49300" (or "release")
    SRC/<iteration>/mp_rank_00_model_states.pt  {"module": state_dict} of model-parallel rank 0
    SRC/<iteration>/mp_rank_01_model_states.pt  ... one file per rank (the release has 8)

Parameter names are glmkit's already (`transformer.layers.N.attention.query_key_value.weight`...).
The ranks hold Megatron-style slices that `tp_layout.merge_tensors` puts back together, minding
GeGLU's [x1_rank; x2_rank] halves. The checkpoint carries no config: the sizes come from the
official launch script's arguments (`configs/model_glm_130b.sh`), or the `glm-130b` preset.

Memory: every rank file is memory-mapped, and each output shard is merged, written and freed
before the next one is built, so the process holds about one output shard, never the model.
Every size is checked against the arguments before anything is written.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from glmkit.checkpoints.files import (
    TORCH_DTYPES,
    CheckpointError,
    first_sentence,
    load_torch_file,
    parse_size,
    plan_shards,
    remove_old_weights,
    write_weights,
)
from glmkit.families.glm130b import FAMILY as GLM_130B
from glmkit.models.config import GLMConfig, glm130b_architecture
from glmkit.models.glm import GLM
from glmkit.parallel.layout import merge_tensors, shard_dim
from glmkit.text.tokenizer import VOCAB_FILE

SHARD_GLOB = "mp_rank_*_model_states.pt"
# The official launch script's argument names, in glmkit's config terms.
SIZE_ARGUMENTS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "inner_hidden_size": "--inner-hidden-size",
    "num_attention_heads": "--num-attention-heads", "vocab_size": "--vocab-size",
    "max_sequence_length": "--max-sequence-length",
}
# Which argument sets each dimension of a parameter, and how many times over (GeGLU doubles dense_h_to_4h).
DIMENSIONS = {
    "word_embeddings.weight": (("--vocab-size", 1), ("--hidden-size", 1)),
    "query_key_value.weight": (("--hidden-size", 3), ("--hidden-size", 1)),
    "query_key_value.bias": (("--hidden-size", 3),),
    "dense_h_to_4h.weight": (("--inner-hidden-size", 2), ("--hidden-size", 1)),
    "dense_h_to_4h.bias": (("--inner-hidden-size", 2),),
    "dense_4h_to_h.weight": (("--hidden-size", 1), ("--inner-hidden-size", 1)),
}


class SatCheckpointError(CheckpointError):
    """A SwissArmyTransformer checkpoint that cannot be converted, with what to do about it."""


def sat_config(num_layers: int, hidden_size: int, num_attention_heads: int, vocab_size: int,
               max_sequence_length: int, inner_hidden_size: int | None = None, layernorm_order: str = "post",
               torch_dtype: str = "float16") -> GLMConfig:
    """The GLM-130B config for the official script's arguments.

    GLM-130B's DeepNorm block replaces SwissArmyTransformer's own layer, so "post" is the only
    layernorm order it has; SAT's default inner size for GeGLU is 4 * hidden * 2 // 3."""
    if layernorm_order != "post":
        raise SatCheckpointError(
            f"--layernorm-order {layernorm_order}: GLM-130B's DeepNorm layers are post-LN ('post', as in "
            "configs/model_glm_130b.sh); a 'pre' or 'sandwich' model is not GLM-130B"
        )
    inner = 4 * hidden_size * 2 // 3 if inner_hidden_size is None else inner_hidden_size
    return GLMConfig(**glm130b_architecture(
        num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads, vocab_size=vocab_size,
        max_sequence_length=max_sequence_length, inner_hidden_size=inner, torch_dtype=torch_dtype,
    ))


@dataclass
class SatCheckpoint:
    """The rank files of one iteration, memory-mapped: [rank] -> {name: tensor}."""

    directory: Path
    ranks: list[dict[str, torch.Tensor]]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def parts(self, name: str) -> list[torch.Tensor]:
        return [rank[name] for rank in self.ranks] if shard_dim(name) is not None else [self.ranks[0][name]]


def iteration_directory(src: Path) -> Path:
    """SRC/<the iteration named in SRC/latest>."""
    if not src.is_dir():
        raise FileNotFoundError(f"SAT checkpoint folder {src} does not exist; pass the folder that holds `latest`")
    latest = src / "latest"
    if not latest.is_file():
        hint = " (this looks like an iteration folder: pass its parent)" if any(src.glob(SHARD_GLOB)) else ""
        raise SatCheckpointError(
            f"{src} has no `latest` file{hint}; a SwissArmyTransformer checkpoint is a folder with `latest` "
            "(holding the iteration) and `<iteration>/mp_rank_XX_model_states.pt`"
        )
    iteration = latest.read_text().strip()
    directory = src / iteration
    if not iteration or not directory.is_dir():
        raise SatCheckpointError(f"{latest} names iteration {iteration!r}, but {directory} does not exist; "
                                 "download that iteration's folder or fix `latest`")
    return directory


def rank_files(directory: Path) -> list[Path]:
    """mp_rank_00 .. mp_rank_{N-1}, every one present."""
    found = {}
    for path in directory.glob(SHARD_GLOB):
        rank = path.name.removeprefix("mp_rank_").removesuffix("_model_states.pt")
        if rank.isdigit():
            found[int(rank)] = path
    if not found:
        raise SatCheckpointError(f"{directory} holds no mp_rank_XX_model_states.pt files; download the shards")
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(max(found) + 1) if r not in found]
    if missing:
        raise SatCheckpointError(f"{directory} lacks {', '.join(missing)}: a model-parallel checkpoint needs every "
                                 "rank's file; download the missing ones")
    return [found[r] for r in sorted(found)]


def load_rank(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = load_torch_file(path)
    except CheckpointError:
        raise  # a refused pickle, named
    except Exception as e:  # a truncated file fails in many types
        raise SatCheckpointError(f"cannot read {path} as weights ({first_sentence(e)}); it is truncated or "
                                 "corrupt: download it again") from e
    if not isinstance(data, dict) or "module" not in data:
        raise SatCheckpointError(f"{path} has no 'module' entry; SAT model states are {{'module': state_dict}}")
    return data["module"]


def open_checkpoint(src: str | Path) -> SatCheckpoint:
    directory = iteration_directory(Path(src).expanduser())
    return SatCheckpoint(directory, [load_rank(path) for path in rank_files(directory)])


def merged_shape(name: str, parts: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """The merged parameter's shape, read from the parts' headers (nothing is merged)."""
    shape = list(parts[0].shape)
    dim = shard_dim(name)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)


def _shape_error(name: str, actual: tuple[int, ...], expected: tuple[int, ...], world: int) -> SatCheckpointError:
    dims = next((v for k, v in DIMENSIONS.items() if name.endswith(k)), (("--hidden-size", 1),) * len(expected))
    if len(actual) == len(expected):
        for dim, ((argument, times), got, want) in enumerate(zip(dims, actual, expected, strict=True)):
            if got != want:
                # Only the count of rank files tells the world size, so a lost last rank looks like a small model.
                ranks = f" (or rank files are missing: {world} found)" if dim == shard_dim(name) else ""
                return SatCheckpointError(
                    f"{name} is {actual} in the checkpoint but the arguments give {expected}: {argument} is "
                    f"{want // times}, the checkpoint says {got // times}; fix {argument}{ranks}"
                )
    return SatCheckpointError(f"{name} is {actual} in the checkpoint but the arguments give {expected}")


def check_against(checkpoint: SatCheckpoint, config: GLMConfig, expected: dict[str, torch.Size]) -> None:
    """Every name, layer and shape against the arguments, before anything is written."""
    names = [n for n in checkpoint.ranks[0] if not GLM_130B.ignores(n)]
    if any(n.endswith(".weight_scale") for n in names):
        raise SatCheckpointError("this is a quantized SAT checkpoint (weight_scale); convert the fp16 one, then "
                                 "quantize with `glmkit quantize`")
    layers = {int(n.split(".")[2]) for n in names if n.startswith("transformer.layers.")}
    if layers and max(layers) + 1 != config.num_layers:
        raise SatCheckpointError(f"the checkpoint has {max(layers) + 1} layers but --num-layers is "
                                 f"{config.num_layers}; fix --num-layers")
    if config.num_attention_heads % checkpoint.world_size:
        raise SatCheckpointError(f"--num-attention-heads {config.num_attention_heads} cannot be split over the "
                                 f"checkpoint's {checkpoint.world_size} model-parallel ranks; fix --num-attention-heads")
    for name in names:
        if name not in expected:
            raise SatCheckpointError(f"the checkpoint holds {name!r}, which GLM-130B does not have; is this a "
                                     "GLM-130B checkpoint?")
        absent = [r for r, rank in enumerate(checkpoint.ranks) if name not in rank]
        if absent:
            raise SatCheckpointError(f"{name} is missing from rank(s) {absent}; the rank files do not belong together")
        actual = merged_shape(name, checkpoint.parts(name))
        if actual != tuple(expected[name]):
            raise _shape_error(name, actual, tuple(expected[name]), checkpoint.world_size)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise SatCheckpointError(f"the checkpoint lacks {', '.join(missing[:5])}"
                                 f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; it is incomplete")


def expected_shapes(config: GLMConfig) -> dict[str, torch.Size]:
    """glmkit's parameters for this config (built on the meta device: no memory), the tied head left out."""
    with torch.device("meta"):
        model = GLM(config)
    return {n: t.shape for n, t in model.state_dict().items() if n != "lm_head.weight"}


def convert_sat(src: str | Path, dst: str | Path, config: GLMConfig, *, dtype: str = "float16",
                max_shard_size: int | str = "2GB", tokenizer: str | Path | None = None,
                progress: bool = True) -> Path:
    """Write a glmkit model directory (config.json, safetensors shards) from a SAT checkpoint."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    checkpoint = open_checkpoint(src)
    config = GLMConfig.from_dict({**config.to_dict(), "torch_dtype": dtype})
    expected = expected_shapes(config)
    check_against(checkpoint, config, expected)
    out = Path(dst).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    remove_old_weights(out)
    target = TORCH_DTYPES[dtype]
    sizes = {n: shape.numel() * target.itemsize for n, shape in expected.items()}
    bar = tqdm(total=len(sizes), desc="merging ranks", unit="tensor", disable=not progress)

    def merged(name: str) -> torch.Tensor:
        tensor = merge_tensors(name, checkpoint.parts(name), config).to(target).contiguous()
        bar.update()
        return tensor

    write_weights(out, plan_shards(sizes, parse_size(max_shard_size)), merged)
    bar.close()
    config.save(out)
    if tokenizer is not None:
        shutil.copyfile(Path(tokenizer).expanduser(), out / VOCAB_FILE)
        check_tokenizer(out, config)
    return out


def check_tokenizer(directory: Path, config: GLMConfig) -> None:
    """The copied ice_text.model must give the model's special ids (icetk puts 20000 image ids in front)."""
    tokenizer = GLM_130B.load_tokenizer(directory)
    pairs = {"<sop>": (tokenizer.bos_token_id, config.bos_token_id), "<eop>": (tokenizer.eos_token_id, config.eos_token_id),
             "[MASK]": (tokenizer.mask_token_id, config.mask_token_id),
             "[gMASK]": (tokenizer.gmask_token_id, config.gmask_token_id)}
    wrong = [f"{piece} is {got} there but {want} in the model" for piece, (got, want) in pairs.items() if got != want]
    if wrong or tokenizer.vocab_size > config.vocab_size:
        (directory / VOCAB_FILE).unlink()
        raise SatCheckpointError(f"the tokenizer does not belong to this model ({'; '.join(wrong) or 'too many ids'}); "
                                 "use icetk's text tokenizer (the first ChatGLM-6B release's ice_text.model)")
