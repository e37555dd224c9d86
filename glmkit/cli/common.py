"""What the subcommands share: the model, sampling and embedding flags, loading a model from them, reading
user input under tensor parallelism, and the one place user mistakes become one-line errors."""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

from glmkit.checkpoints.hf import CheckpointError
from glmkit.generation.chat import CHAT_DEFAULTS, FAMILY_CHAT_DEFAULTS
from glmkit.models.config import ConfigError
from glmkit.parallel import tp as tp_lib
from glmkit.pretrained import NoDefaultModelError, load
from glmkit.quant.quantize import KERNELS
from glmkit.text.formats import chat_format_for

# A user's mistake (a missing directory, a bad value): one line on stderr and exit code 2, not a traceback.
# pickle.UnpicklingError: a pickled file (a P-Tuning checkpoint, say) that torch's weights_only loader refused
# outside glmkit.checkpoints, which names the file itself (RefusedPickleError).
USER_ERRORS = (NoDefaultModelError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               CheckpointError, ConfigError, ValueError, tp_lib.TPError, pickle.UnpicklingError)
USER_ERROR_EXIT = 2


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model, so that they all load it the same way."""
    parser.add_argument("--model", "-m", type=Path, default=None,
                        help="model directory in the official HF layout, or a shipped model's name: demo-model, glm4-demo "
                             "(default: the shipped demo model)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="compute dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None,
                        help="quantize the block linears to INT8 or INT4 (group-wise) while loading; a checkpoint "
                             "written by 'glmkit quantize' is loaded quantized without this flag")
    add_embedding_args(parser, "--quantize-embeddings", "while loading")
    add_kernels_arg(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: PyTorch's choice, usually one per core)")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a LoRA or P-Tuning v2 adapter directory to apply (glmkit finetune's output, a PEFT "
                             "LoRA adapter, or an official ptuning checkpoint)")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks: run under 'torchrun --nproc-per-node N' with --tp N; each rank "
                             "loads only its shard (default: 1)")
    parser.add_argument("--tp-timeout", type=float, default=300.0,
                        help="seconds a tensor-parallel collective may wait for the other ranks before the job stops "
                             "with an error (default: %(default)s)")


def add_embedding_args(parser: argparse.ArgumentParser, flag: str, when: str) -> None:
    """FLAG and --embedding-bits: loading, quantize and bench name the switch differently but mean one thing."""
    parser.add_argument(flag, action="store_true",
                        help=f"also quantize the word embedding and output layer {when} (INT8 rows unless "
                             "--embedding-bits 4)")
    parser.add_argument("--embedding-bits", type=int, choices=[4, 8], default=None,
                        help=f"bits for the embedding and output table (implies {flag}): 8 (one scale per token) or "
                             "4 (one scale per 128 columns); ChatGLM-6B's table is 2.1 GB in fp32, 0.53 GB at 8 bits, "
                             "0.28 GB at 4, and decoding reads all of it for every token")


def add_kernels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernels", choices=list(KERNELS), default="native",
                        help="how INT8/INT4 layers multiply on CPU: native (glmkit's kernels, activations rounded to "
                             "int8 per 64 columns, fastest) or exact (float activations through PyTorch's ops: the "
                             "official quantized model's numbers, slower; docs/quantization.md) (default: %(default)s)")


def embedding_bits_from(args: argparse.Namespace, flag: str) -> int:
    """Bits for the embedding table: --embedding-bits, else 8 when FLAG is set, else 0 (not quantized)."""
    return args.embedding_bits or (8 if getattr(args, flag) else 0)


def check_device(name: str) -> None:
    """--device names a device this PyTorch build has (one line, not torch's assertion deep in loading)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device PyTorch knows; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    available = getattr(backend, "is_available", lambda: False)()
    if not available:
        why = ("it was built without CUDA (a CPU-only wheel)" if device.type == "cuda" and torch.version.cuda is None
               else f"no {device.type} device is visible")
        raise ValueError(f"--device {name}: this PyTorch {torch.__version__} cannot use it, {why}; use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: there {'is' if count == 1 else 'are'} only {count} {device.type} "
                         f"device(s), numbered from 0")


def load_from_args(args: argparse.Namespace, progress: bool = True):
    """(model, tokenizer) as the model flags say; ARGS also learns the model's own sampling defaults (what an
    unset --temperature, --top-p, --top-k or --max-length means for the one-shot commands)."""
    check_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, progress=progress,
                            quantize=args.quantize, adapter=args.adapter, tp=args.tp, tp_timeout=args.tp_timeout,
                            quantize_embeddings=embedding_bits_from(args, "quantize_embeddings"), kernels=args.kernels)
    args.model_sampling_defaults = model_sampling_defaults(tokenizer)
    return model, tokenizer


def from_rank0(value, tp: int):
    """Under --tp, rank 0's value (user input) on every rank: the others follow rank 0's inputs."""
    return tp_lib.broadcast_object(value if tp_lib.rank() == 0 else None) if tp > 1 else value


def text_argument(words: list[str], tp: int) -> str:
    """The words of the command line, or stdin for `-` (read by rank 0 alone under --tp)."""
    reads_stdin = words == ["-"] and tp_lib.rank() == 0
    return from_rank0(sys.stdin.read() if reads_stdin else " ".join(words), tp)


# The flags whose default is the model's own (its family's official chat() default): None on the command line.
MODEL_DEFAULT_FLAGS = ("temperature", "top_p", "top_k", "max_length")
# ChatGLM-6B's (and GLM-130B's) chat format, and the families FAMILY_CHAT_DEFAULTS names, as the help says them.
FAMILY_NAMES = {"chatglm-6b": "ChatGLM-6B", "chatglm2": "ChatGLM2", "chatglm3": "ChatGLM3", "glm4": "GLM-4"}


def model_sampling_defaults(tokenizer) -> dict:
    """The official chat() defaults of the tokenizer's family (what glmkit.generation.chat.chat_params applies)."""
    defaults = {**CHAT_DEFAULTS, **FAMILY_CHAT_DEFAULTS.get(chat_format_for(tokenizer).name, {})}
    return {k: defaults[k] for k in MODEL_DEFAULT_FLAGS}


def model_default_help(key: str) -> str:
    """"(default: the model's own: 0.95 for ChatGLM-6B, 0.8 for ChatGLM2/ChatGLM3/GLM-4)", from the tables."""
    by_value: dict = {CHAT_DEFAULTS[key]: ["ChatGLM-6B"]}
    for name, defaults in FAMILY_CHAT_DEFAULTS.items():
        by_value.setdefault(defaults.get(key, CHAT_DEFAULTS[key]), []).append(FAMILY_NAMES.get(name, name))
    if len(by_value) == 1:
        return f"(default: the model's own, {CHAT_DEFAULTS[key]} for every family)"
    shown = ", ".join(f"{value} for {'/'.join(names)}" for value, names in by_value.items())
    return f"(default: the model's own, as its official chat() has it: {shown})"


def add_sampling_args(parser: argparse.ArgumentParser, sample_by_default: bool) -> None:
    """Sampling and beam-search flags; chat samples by default (--greedy), the one-shot commands do not (--sample).
    --temperature, --top-p, --top-k and --max-length default to the model family's own values (None here)."""
    group = parser.add_argument_group("sampling")
    parser.set_defaults(sample_by_default=sample_by_default)
    if sample_by_default:
        group.add_argument("--greedy", dest="do_sample", action="store_false", help="always pick the likeliest token")
    else:
        group.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=None,
                       help="divides the logits: below 1 sharper, above 1 more varied "
                            + model_default_help("temperature"))
    group.add_argument("--top-p", type=float, default=None,
                       help="sample from the likeliest tokens that make up this probability "
                            + model_default_help("top_p"))
    group.add_argument("--top-k", type=int, default=None,
                       help="sample from this many likeliest tokens; 0 disables top-k " + model_default_help("top_k"))
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="above 1: tokens already in the text become less likely (default: %(default)s)")
    group.add_argument("--max-length", type=int, default=None,
                       help="prompt plus answer, in tokens " + model_default_help("max_length"))
    group.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    add_beam_args(parser)


def add_beam_args(parser: argparse.ArgumentParser) -> None:
    """Beam-search flags, in a help section of their own because they replace sampling."""
    group = parser.add_argument_group("beam search (deterministic; replaces sampling)")
    group.add_argument("--num-beams", type=int, default=1, help="beams kept at each step (default 1: no search)")
    group.add_argument("--length-penalty", type=float, default=1.0,
                       help="GNMT exponent: score = log-prob / ((5 + length) / 6) ** this; > 0 favours longer answers")
    group.add_argument("--early-stopping", nargs="?", const="true", default="false", choices=["true", "false", "never"],
                       help="true (the bare flag): stop once NUM_BEAMS answers have ended; false (default): also stop "
                            "when the best running beam, ended now, would lose; never: only when none can still win")
    group.add_argument("--no-repeat-ngram-size", type=int, default=0,
                       help="never repeat an n-gram of the answer (also applies without beams)")
    group.add_argument("--min-new-tokens", type=int, default=0, help="no end token before this many tokens")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags as keyword arguments of SamplingParams / model.chat.

    A flag left unset (None: the model's own default) is left out for chat, so that chat_params applies the
    family's chat() defaults; the one-shot commands build SamplingParams themselves, so for them it is filled
    from the loaded model's defaults (load_from_args), else ChatGLM-6B's."""
    # Chat samples by default; beams replace sampling, so they switch that default off (--sample with
    # beams on `generate` still fails loudly).
    chat = getattr(args, "sample_by_default", False)
    do_sample = args.do_sample and not (args.num_beams > 1 and chat)
    early_stopping = {"true": True, "false": False}.get(args.early_stopping, "never")
    given = {key: getattr(args, key) for key in MODEL_DEFAULT_FLAGS if getattr(args, key) is not None}
    if not chat:
        defaults = getattr(args, "model_sampling_defaults", None) or {k: CHAT_DEFAULTS[k] for k in MODEL_DEFAULT_FLAGS}
        given = {**defaults, **given}
    return dict(do_sample=do_sample, **given, repetition_penalty=args.repetition_penalty, seed=args.seed,
                num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens)


def set_up_process(args: argparse.Namespace) -> None:
    """Process-wide settings the flags ask for, before any command runs: quiet non-zero ranks, torch's threads."""
    if getattr(args, "tp", 1) > 1:
        tp_lib.silence_other_ranks()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def run_reporting_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """RUN(ARGS)'s exit code; a user's mistake is printed as `glmkit: error: ...` and exits with 2."""
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"glmkit: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT


def one_line(error: BaseException) -> str:
    """The error as one line: glmkit's own messages are; a library's may run to paragraphs (torch's advice)."""
    if isinstance(error, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL (\S+)", str(error))
        return ("a pickled file holds Python objects that glmkit will not unpickle"
                f"{f' (it asks for {refused.group(1)})' if refused else ''}: only plain tensors are read from "
                "pickled files, since unpickling anything else can run code")
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror.lower()}"
    return " ".join(str(error).split()) or type(error).__name__
