"""What every checkpoint format here shares: the weight files' names, the dtypes they are saved in, reading
a torch pickle safely, and writing size-capped shards with their index (hf, sat and reshard build on it).
"""

from __future__ import annotations

import ctypes
import json
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glmkit.models.config import DTYPES

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
# config.json's torch_dtype names (glmkit.models.config.DTYPES, torch-free) -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded, with what to do about it."""


class RefusedPickleError(CheckpointError):
    """A .bin / .pt file that holds Python objects besides tensors, which glmkit will not unpickle."""


def refused_pickle(path: Path, error: pickle.UnpicklingError) -> RefusedPickleError:
    """One line naming the file and what it holds; never torch's advice to turn weights_only off."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f" (it asks for {found.group(1)})" if found else ""
    return RefusedPickleError(f"{path} holds Python objects that glmkit will not unpickle{what}: only plain tensors "
                              "are read from pickled files, since unpickling anything else can run code; use a "
                              "safetensors copy from the original source instead")


def load_torch_file(path: Path, mmap: bool = True) -> Any:
    """A .bin / .pt file's contents, memory-mapped where its format allows (and `mmap`).

    weights_only: these files are pickles, and pickles from the internet must not run code. A file that
    holds anything else is a RefusedPickleError naming it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format, cannot be mapped
    except pickle.UnpicklingError as e:
        raise refused_pickle(path, e) from e


def first_sentence(error: BaseException) -> str:
    """The gist of a library's error (torch's run to paragraphs of advice), on one line."""
    text = " ".join(str(error).split())
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). The full-precision weights freed after quantizing
    sit between the kept int8 ones, and glibc would otherwise keep them all: measured, loading a
    150M-parameter model at INT4 peaked at the fp32 model's size without this, at a third with it."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _load_libc()


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a bigger tensor gets one of its own)."""
    plan: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if plan[-1] and size + nbytes > max_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    return plan


def write_weights(directory: Path, plan: list[list[str]], tensor: Callable[[str], torch.Tensor],
                  safe_serialization: bool = True) -> None:
    """Write the planned shards (and their index) one at a time, asking for each tensor only when its shard
    is written: a converter can then build tensors on the fly and hold one shard in memory, not the model."""
    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if len(plan) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(plan):05d}.{ext}" for i in range(len(plan))
    ]
    total = 0
    for name, keys in zip(names, plan, strict=True):
        shard = {key: tensor(key) for key in keys}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        if safe_serialization:
            save_file(shard, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(shard, directory / name)
        del shard
        release_freed_memory()
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {key: name for name, keys in zip(names, plan, strict=True) for key in keys},
        }
        (directory / (SAFE_INDEX if safe_serialization else BIN_INDEX)).write_text(json.dumps(index, indent=2) + "\n")


def remove_old_weights(directory: Path) -> None:
    """Stale shards of an earlier save would shadow or mix with the new ones at load time."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin", SAFE_INDEX, BIN_INDEX):
        for old in directory.glob(pattern):
            old.unlink()
