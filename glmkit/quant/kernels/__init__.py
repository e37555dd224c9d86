"""glmkit's native CPU kernels: built from C on first use, called through ctypes.

Why C through ctypes rather than a torch C++ extension: the kernels need no torch headers, so the
first build takes about a second with the system's gcc instead of a minute, and nothing is compiled
at install time (the official ChatGLM-6B INT4 code builds its CPU kernels the same way). The shared
library is cached by the hash of its source and compiler command (`$GLMKIT_KERNEL_CACHE`, default
`~/.cache/glmkit/quant/kernels`). Where there is no compiler, no AVX2/FMA, or `GLMKIT_NATIVE_KERNELS=0`,
`available()` is False and the quantized layers use PyTorch's ops instead.

Two kernel sets are built into the one library and chosen per call: AVX2 (any x86 CPU of the last
decade) and AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4), which reads 128 INT4 weights
per load and reuses each unpacked load across four prompt rows. `GLMKIT_KERNEL_ISA=avx2` holds a
machine to the AVX2 set (to compare them, or to rule one out).

Prompts are different: on CPUs with AMX, oneDNN's bf16 matmul is several times faster than any
integer kernel here, so from `DENSE_MIN_ROWS` rows on, the weights are dequantized to bf16 a few
megabytes at a time and multiplied by PyTorch (bench/kernels.py measures both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int_matmul.c")
BLOCK = 64  # activation quantization block of the kernels; k and INT4 groups must be multiples of it
DENSE_MIN_ROWS = 24  # rows from which the bf16 path wins on AMX: bench/kernels.py --rows 16 32 puts the crossing near 24
DEQUANTIZE_CHUNK_BYTES = 16 << 20  # bf16 weights dequantized at a time: cache-sized, a small transient
COMPILE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    return Path(os.environ.get("GLMKIT_KERNEL_CACHE") or Path.home() / ".cache" / "glmkit" / "kernels")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def build(compiler: str) -> Path:
    """Compile the kernels once per source and compiler; written to a temporary name and renamed,
    so concurrent first uses (tests, torchrun ranks) never load a half-written library."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(source + version.encode() + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"int_matmul-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        result = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) when they cannot run here."""
    if os.environ.get("GLMKIT_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("no C compiler (gcc) found: quantized layers use PyTorch's slower int4/int8 ops; "
                      "install gcc for glmkit's native kernels", stacklevel=3)
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler)))
    except (OSError, RuntimeError) as error:
        warnings.warn(f"glmkit's native kernels are unavailable ({error}); using PyTorch's ops", stacklevel=3)
        return None
    if not lib.glmkit_cpu_level():
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.glmkit_int4_matmul.argtypes = [pointer, i64, i64, pointer, i64, pointer, i32, i64, pointer, i32, i32]
    lib.glmkit_int8_matmul.argtypes = [pointer, i64, i64, pointer, i64, pointer, i32, pointer, i32, i32]
    lib.glmkit_int4_matmul.restype = lib.glmkit_int8_matmul.restype = ctypes.c_int
    lib.glmkit_dequantize_bf16.argtypes = [pointer, i32, i64, i64, i64, pointer, i32, i64, pointer, i32, i32]
    lib.glmkit_dequantize_bf16.restype = None
    return lib


def available() -> bool:
    return library() is not None


ISAS = {"avx2": 1, "avx512": 2}  # glmkit_cpu_level's numbering


@cache
def cpu_level() -> int:
    """glmkit_cpu_level() once per process: it is asked on every matmul."""
    return library().glmkit_cpu_level() if available() else 0


def cpu_isas() -> list[str]:
    """The kernel sets this CPU runs, best last (empty without the kernels)."""
    return [name for name, number in ISAS.items() if number <= cpu_level()]


def isa() -> str:
    """The kernel set the next call uses: the best this CPU runs, capped by `GLMKIT_KERNEL_ISA`."""
    cap = os.environ.get("GLMKIT_KERNEL_ISA", "avx512")
    if cap not in ISAS:
        raise ValueError(f"GLMKIT_KERNEL_ISA={cap!r}: use one of {', '.join(ISAS)}")
    level = min(cpu_level(), ISAS[cap])
    return next(name for name, number in ISAS.items() if number == level)


def supports(in_features: int, group_size: int, bits: int) -> bool:
    """Whether a layer of this shape runs in the kernels: blocks of 64 columns, INT4 groups of 64s."""
    if in_features % BLOCK:
        return False
    return bits == 8 and group_size == 0 or bits == 4 and (group_size or in_features) % BLOCK == 0


def _scale_args(scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    if scales.dtype == torch.bfloat16:
        return scales.contiguous(), 1
    return scales.float().contiguous(), 0


@cache
def dense_prompts() -> bool:
    """Whether many-row matmuls go through bf16: only where PyTorch's bf16 matmul has AMX."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def prompt_through_bf16(rows: int) -> bool:
    return rows >= DENSE_MIN_ROWS and dense_prompts()


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ W^T for W in the official INT4 packing [out, in/2] with scales [out] or
    [out, groups]; a float32 (or, for prompts through bf16, bf16) result that the caller casts."""
    group = x.shape[1] // (scales.shape[1] if scales.dim() == 2 else 1)
    if prompt_through_bf16(x.shape[0]):
        return _dense(x, weight, scales, 4, group)
    return _run(library().glmkit_int4_matmul, x, weight, scales, group)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ W^T for int8 W [out, in] with one scale per row; float32 (or bf16) result."""
    if prompt_through_bf16(x.shape[0]):
        return _dense(x, weight, scales, 8, x.shape[1])
    return _run(library().glmkit_int8_matmul, x, weight, scales)


def dequantize_bf16(weight: torch.Tensor, scales: torch.Tensor, bits: int, group: int, start: int, stop: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of a quantized weight as bf16 [stop - start, in], into `out` if given."""
    in_features = weight.shape[1] * (2 if bits == 4 else 1)
    scales, bf16 = _scale_args(scales)
    out = torch.empty(stop - start, in_features, dtype=torch.bfloat16) if out is None else out
    library().glmkit_dequantize_bf16(weight.contiguous().data_ptr(), bits, start, stop, in_features, scales.data_ptr(),
                                     bf16, group, out.data_ptr(), torch.get_num_threads(), ISAS[isa()])
    return out


def _dense(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    rows, in_features = x.shape
    out_features = weight.shape[0]
    chunk = max(16, DEQUANTIZE_CHUNK_BYTES // (2 * in_features))
    buffer = torch.empty(min(chunk, out_features), in_features, dtype=torch.bfloat16)
    activations = x.to(torch.bfloat16)
    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    for start in range(0, out_features, chunk):
        stop = min(out_features, start + chunk)
        y[:, start:stop] = activations @ dequantize_bf16(weight, scales, bits, group, start, stop, buffer[: stop - start]).T
    return y


def _run(kernel, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, *group: int) -> torch.Tensor:
    rows, in_features = x.shape
    x32, weight = x.float().contiguous(), weight.contiguous()
    scales, bf16 = _scale_args(scales)
    y = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    if rows == 0:
        return y
    if kernel(x32.data_ptr(), rows, in_features, weight.data_ptr(), weight.shape[0], scales.data_ptr(), bf16, *group,
              y.data_ptr(), torch.get_num_threads(), ISAS[isa()]):
        raise MemoryError(f"the native kernel could not allocate int8 activations for {rows} x {in_features}")
    return y
