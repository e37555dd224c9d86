"""The commands that work on model directories: describe (`info`), quantize, reshard, convert and merge them,
and `bench` the code that runs them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from glmkit.checkpoints.hf import describe
from glmkit.cli.common import add_embedding_args, add_kernels_arg, add_model_args, embedding_bits_from, load_from_args
from glmkit.engine.scheduler import DEFAULT_STEP_TOKENS
from glmkit.models.config import GLMConfig
from glmkit.pretrained import GLMForCausalLM
from glmkit.quant.quantize import embedding_group

CONVERT_EPILOG = """\
SRC is the folder the official scripts pass as --load: it holds `latest` (the iteration) and
<iteration>/mp_rank_00_model_states.pt ... one file per model-parallel rank, any number of ranks.
The checkpoint stores no config, so give the sizes as the official script does
(configs/model_glm_130b.sh), or --preset glm-130b for the released model; arguments given
next to --preset override it.

examples:
  glmkit convert --from sat ~/glm-130b-sat ~/models/glm-130b --preset glm-130b
  glmkit convert --from sat ckpt out --num-layers 2 --hidden-size 64 --inner-hidden-size 96 \\
      --num-attention-heads 4 --vocab-size 150528 --max-sequence-length 2048 --layernorm-order post

The output loads with GLMForCausalLM.from_pretrained(DST) and is described by `glmkit info DST`.
For text, copy icetk's text tokenizer (ice_text.model; the first ChatGLM-6B release ships the same
file) into DST, or pass it with --tokenizer."""

SAVE_DTYPES = ["float16", "bfloat16", "float32"]


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """A path, not --model: info reads the files and never loads the default model."""
    parser.add_argument("path", type=Path)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def quantization_lines(config: dict) -> list[str]:
    """info's lines on what is quantized, in the words of the layout each scale follows."""
    lines = []
    if config.get("quantization_bit"):
        group = config.get("quantization_group_size") or 0
        lines.append(f"quantized    INT{config['quantization_bit']} block linears, "
                     f"{f'one scale per {group} columns' if group else 'one scale per row (official layout)'}")
    if config.get("quantization_embedding_bit"):
        bits = config["quantization_embedding_bit"]
        group = embedding_group(bits, config["hidden_size"])
        lines.append(f"quantized    INT{bits} word embedding and output layer, "
                     f"{f'one scale per {group} columns' if group else 'one scale per token'}")
    return lines


MLPS = {"gelu": "GELU", "geglu": "GeGLU", "swiglu": "SwiGLU"}
POSITIONS = {"2d-prefix-lm": "2D prefix-LM positions", "1d-prefix-lm": "1D prefix-LM positions",
             "causal": "causal positions"}


# describe()'s family (a THUDM-layout directory: its generation) as info names it.
FAMILY_NAMES = {"chatglm-6b": "ChatGLM-6B", "glm-130b": "GLM-130B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B",
                "glm-4": "GLM-4 (THUDM layout)", "glm": "GLM-4 (transformers glm)",
                "glm4": "GLM-4-0414 (transformers glm4)"}


def architecture(config: GLMConfig, family: str | None = None) -> str:
    """info's architecture line, read from the config: depth and width, attention, MLP, norms, positions."""
    heads = f"{config.num_attention_heads} heads"
    if config.kv_heads != config.num_attention_heads:
        heads += f" ({config.kv_heads} KV heads, grouped-query)"
    norm = "RMSNorm" if config.rmsnorm else "LayerNorm"
    residual = "DeepNorm" if config.apply_residual_connection_post_layernorm else "pre-norm"
    if config.sandwich_norm:
        residual += " with sandwich norms"
    rotary = f"{'NeoX' if config.rotary_style == 'neox' else 'interleaved'} rotary"
    if config.partial_rotary_factor < 1:
        rotary += f" on {config.partial_rotary_factor:g} of each head"
    name = FAMILY_NAMES.get(family, family or "GLM")
    return (f"{name}: {config.num_layers} layers, hidden {config.hidden_size}, {heads} of {config.head_dim}, "
            f"{MLPS[config.mlp_type]} MLP {config.inner_hidden_size}; {norm}, {residual}; "
            f"{POSITIONS[config.position_layout]}, {rotary}")


def count_in_units(n: int) -> str:
    """4,961,792 -> 5.0 M; 6,173,286,400 -> 6.2 B."""
    for factor, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    """What a model directory holds, from its config and file headers (no weights loaded)."""
    facts = describe(args.path)
    if args.json:
        print(json.dumps(facts, indent=2, ensure_ascii=False))
        return 0
    c = facts["config"]
    print(f"model        {facts['path']}")
    print(f"architecture {architecture(GLMConfig.from_dict(c), facts.get('family'))}")
    print(f"vocabulary   {c['vocab_size']} ids; context {c['max_sequence_length']} tokens")
    print(f"parameters   {facts['parameters']:,} ({count_in_units(facts['parameters'])})")
    print(f"dtype        {', '.join(facts['dtype_on_disk'])} on disk (config: {c['torch_dtype']})")
    for line in quantization_lines(c):
        print(line)
    print(f"size on disk {facts['size_on_disk_bytes'] / 2**20:.1f} MiB in {len(facts['weight_files'])} weight file(s)")
    name = facts.get("tokenizer_file", "ice_text.model")
    print(f"tokenizer    {f'{name} present' if facts['tokenizer'] else f'missing (no {name})'}")
    return 0


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """--bits is required: the two layouts differ in size and quality, so there is no silent default."""
    parser.add_argument("src", type=Path, help="a full-precision model directory")
    parser.add_argument("dst", type=Path, help="where to write the quantized model")
    parser.add_argument("--bits", type=int, choices=[4, 8], required=True)
    parser.add_argument("--group-size", type=int, default=None,
                        help="INT4 input columns per scale (default 128; 0: one scale per row, the official layout)")
    add_embedding_args(parser, "--embeddings", "(glmkit's own config key: the official code cannot load it)")
    parser.add_argument("--dtype", choices=SAVE_DTYPES, default="float16",
                        help="dtype of the scales, biases, norms and embeddings on disk (default: float16)")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize while loading, then save: the result is an ordinary model directory."""
    model = GLMForCausalLM.from_pretrained(args.src, quantize=args.bits, group_size=args.group_size,
                                           quantize_embeddings=embedding_bits_from(args, "embeddings"))
    out = model.save_pretrained(args.dst, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    print(f"glmkit: wrote a {args.bits}-bit model to {out} ({size / 2**20:.1f} MiB of weights)")
    return 0


def add_reshard_arguments(parser: argparse.ArgumentParser) -> None:
    """--tp here is the size to write, not a run option, so it is required and takes no --tp-timeout."""
    parser.add_argument("src", type=Path, help="a model directory (unsharded or resharded)")
    parser.add_argument("dst", type=Path, help="where to write the resharded model")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel size to write (1: unsharded)")


def cmd_reshard(args: argparse.Namespace) -> int:
    """Write per-rank files and say how to load them."""
    from glmkit.checkpoints.reshard import reshard

    files = reshard(args.src, args.dst, args.tp)
    size = sum(f.stat().st_size for f in files)
    how = f"--tp {args.tp} (torchrun --nproc-per-node {args.tp})" if args.tp > 1 else "without --tp"
    print(f"glmkit: wrote {len(files)} weight file(s), {size / 2**20:.1f} MiB, to {args.dst}; load it {how}")
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The official launch scripts' size arguments, under their own names, since the checkpoint stores none."""
    parser.add_argument("--from", dest="source", choices=["sat"], required=True,
                        help="checkpoint format: sat = SwissArmyTransformer (GLM-130B's official release)")
    parser.add_argument("src", type=Path, help="the SAT checkpoint folder (holds `latest`)")
    parser.add_argument("dst", type=Path, help="the model directory to write")
    parser.add_argument("--preset", choices=["glm-130b"], default=None, help="the released model's sizes")
    sizes = parser.add_argument_group("sizes (the official scripts' arguments)")
    for flag in ("--num-layers", "--hidden-size", "--inner-hidden-size", "--num-attention-heads", "--vocab-size",
                 "--max-sequence-length"):
        sizes.add_argument(flag, type=int, default=None)
    sizes.add_argument("--layernorm-order", default="post", help="GLM-130B's is 'post' (the only one supported)")
    parser.add_argument("--dtype", choices=SAVE_DTYPES, default="float16",
                        help="dtype of the written weights (default: float16, the release's)")
    parser.add_argument("--max-shard-size", default="2GB", help="size of each output safetensors file (default 2GB)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="an ice_text.model to copy into DST")


def cmd_convert(args: argparse.Namespace) -> int:
    """Merge the SAT shards; the sizes come from --preset, overridden by the size flags, and none may be missing."""
    from glmkit.checkpoints.sat import SIZE_ARGUMENTS, convert_sat, sat_config
    from glmkit.models.config import PRESETS

    sizes = dict(PRESETS[args.preset]) if args.preset else {}
    sizes = {k: v for k, v in sizes.items() if k in SIZE_ARGUMENTS}
    sizes.update({k: getattr(args, k) for k in SIZE_ARGUMENTS if getattr(args, k) is not None})
    missing = [flag for key, flag in SIZE_ARGUMENTS.items() if key not in sizes and key != "inner_hidden_size"]
    if missing:
        raise ValueError(f"the checkpoint stores no config: give {', '.join(missing)} (as the official launch "
                         "script does) or --preset glm-130b")
    config = sat_config(**sizes, layernorm_order=args.layernorm_order)
    out = convert_sat(args.src, args.dst, config, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      tokenizer=args.tokenizer)
    print(f"glmkit: wrote {out} ({config.num_layers} layers, hidden {config.hidden_size}, {args.dtype})")
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """A shape, not --model: bench builds random weights, so a 6B run needs no checkpoint."""
    parser.add_argument("--shape", choices=["chatglm-6b", "chatglm3-6b", "glm-4-9b", "tiny", "tiny-gqa"], default="tiny",
                        help="chatglm3-6b and glm-4-9b: the ChatGLM2/3 and GLM-4-9B architecture (GQA, untied output)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=None, help="weight-only INT8/INT4 block linears")
    add_embedding_args(parser, "--quantize-embeddings", "as built")
    add_kernels_arg(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="weights (full precision) or activations, scales and the rest (quantized)")
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[32, 512], help="prefill lengths to time")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps to time (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="prefill repeats (median reported)")
    parser.add_argument("--load", action="store_true", help="also time loading it back from a safetensors checkpoint")
    parser.add_argument("--json", action="store_true", help="print JSON")
    engine = parser.add_argument_group("the engine (continuous batching, no HTTP): instead of the single-stream run")
    engine.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="N",
                        help="N requests of --prompt-len's first value at once, --new-tokens each: aggregate decode "
                             "tokens/s, p50/p95 inter-token latency, time to first token, peak RSS (e.g. 1 2 4 8 16)")
    engine.add_argument("--long-prompt", type=int, default=None, metavar="TOKENS",
                        help="also: a prompt of TOKENS arrives while the --concurrency streams decode; their "
                             "inter-token latency meanwhile, with the prompt in one piece and in --step-tokens chunks")
    engine.add_argument("--step-tokens", type=int, default=DEFAULT_STEP_TOKENS,
                        help="the engine's tokens per step (default: %(default)s)")
    engine.add_argument("--kv-cache-mb", type=float, default=None,
                        help="the engine's KV-cache pool (default: room for every request's whole length)")


def cmd_bench(args: argparse.Namespace) -> int:
    """One configuration per process, so that the peak memory reported is its own."""
    from glmkit.perf.speed import report, run

    if args.concurrency:
        return bench_engine(args)
    result = run(args.shape, args.bits or 0, args.dtype, args.prompt_len, args.new_tokens,
                 measure_load=args.load, repeats=args.repeats,
                 embeddings=embedding_bits_from(args, "quantize_embeddings"), kernel_choice=args.kernels)
    print(report([result], args.json))
    return 0


def bench_engine(args: argparse.Namespace) -> int:
    """`glmkit bench --concurrency`: the engine's throughput and latencies on the random model, as JSON, with the
    machine's read bandwidth and the batch-1 bound it sets."""
    import torch

    from glmkit.engine import throughput
    from glmkit.perf import speed

    model = speed.build(args.shape, args.bits or 0, args.dtype, embedding_bits_from(args, "quantize_embeddings"),
                        args.kernels)
    bandwidth, weights = speed.read_bandwidth_gb_per_s(), speed.decode_weight_bytes(model)
    options = {"step_tokens": args.step_tokens, "kv_cache_mb": args.kv_cache_mb}
    throughput.concurrency(model, 1, 8, 2, **options)  # warm-up: kernels pack their weights on first use
    result = {"shape": args.shape, "bits": args.bits, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "read_bandwidth_gb_per_s": bandwidth, "decode_weight_bytes": weights,
              "batch1_bound_tokens_per_s": round(bandwidth * 1e9 / weights, 2),
              "concurrency": [throughput.concurrency(model, n, args.prompt_len[0], args.new_tokens, **options)
                              for n in args.concurrency]}
    if args.long_prompt:
        streams = args.concurrency[-1]
        result["long_prompt"] = [
            throughput.long_prompt(model, streams, args.long_prompt, args.new_tokens,
                                   **{**options, "step_tokens": step})
            for step in (args.long_prompt + streams, args.step_tokens)]  # in one piece, then in chunks
    result["peak_rss_gib"] = round(speed.peak_rss_gib(), 3)
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # other jobs on the machine skew every number
    print(json.dumps({"machine": speed.machine(), "results": [result]}, indent=2))
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags (--adapter among them) say what to merge; --save-dtype, since --dtype is the compute dtype."""
    add_model_args(parser)
    parser.add_argument("--output", "-o", type=Path, required=True)
    parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default=None,
                        help="dtype on disk (default: the base checkpoint's)")


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the adapter in and save model and tokenizer, so that the output needs no adapter to load."""
    from glmkit.peft.adapters import merge_adapter

    if args.adapter is None:
        raise ValueError("merge needs --adapter DIR (the adapter to fold into --model)")
    if args.tp > 1:
        raise ValueError("merge runs in one process; drop --tp (glmkit reshard splits the merged model afterwards)")
    model, tokenizer = load_from_args(args)
    merge_adapter(model)
    out = model.save_pretrained(args.output, dtype=args.save_dtype or model.config.torch_dtype)
    tokenizer.save_pretrained(out)
    print(f"glmkit: merged model written to {out}")
    return 0
