"""The commands that score a model: `eval` (GLM-130B's task harness), `eval-chat` (the demo's skills, exact match)
and `eval-gen` (BLEU / ROUGE, as the official P-Tuning scripts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glmkit.cli.common import add_model_args, load_from_args
from glmkit.parallel import tp as tp_lib


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Tasks are positional and optional: with none, every shipped task runs."""
    parser.add_argument("tasks", nargs="*", help="task YAML files, folders of them, or shipped task names")
    add_model_args(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: each task's "
                                                                     "micro-batch-size)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N examples (documents for perplexity) "
                                                                "of each data file")
    parser.add_argument("--data-path", type=Path, default=None,
                        help="root of the relative data paths in your YAML files (GLM-130B's DATA_PATH; default: "
                             "each YAML file's folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_eval(args: argparse.Namespace) -> int:
    """Print the results table (and write --json); every task file is read before the model loads."""
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


def add_scored_data_arguments(parser: argparse.ArgumentParser, data_help: str, batch_size: int) -> None:
    """What the commands that score a model on a JSONL file share: the model, the file, the batch, --json."""
    add_model_args(parser)
    parser.add_argument("--data", type=Path, required=True, help=data_help)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--json", action="store_true")


def add_eval_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """--by-template: a skill's accuracy can hide one phrasing the model never learned."""
    add_scored_data_arguments(parser, "JSONL of {skill, lang, prompt, response, history}", batch_size=32)
    parser.add_argument("--by-template", action="store_true",
                        help="also one row per phrasing (the records' template id), with an example question")


def print_accuracy_rows(title: str, rows: dict[str, dict], examples: bool) -> None:
    """One table of correct / total / accuracy per key (and, with EXAMPLES, each row's example question)."""
    print(f"{title:24} {'correct':>8} {'total':>6} {'accuracy':>9}{'  e.g.' if examples else ''}")
    for key, row in rows.items():
        print(f"{key:24} {row['correct']:>8} {row['total']:>6} {row['accuracy']:>9.1%}"
              f"{'  ' + str(row['example']) if examples else ''}")


def cmd_eval_chat(args: argparse.Namespace) -> int:
    """Per skill and language: accuracy, whether answers come in the reference's language, and one sample each."""
    from glmkit.eval.skills import exact_match, skill_rows
    from glmkit.training.demo import read_jsonl

    model, tokenizer = load_from_args(args, progress=False)
    report = exact_match(model, tokenizer, read_jsonl(args.data), batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    samples, language = report["samples"], report["answer_language_match"]
    print_accuracy_rows("skill/lang", skill_rows(report), examples=False)
    if args.by_template:
        print()
        print_accuracy_rows("skill/lang#template", report["by_template"], examples=True)
    print("answers in the reference answer's language: " + ", ".join(f"{k} {v:.1%}" for k, v in language.items()))
    for skill, rows in samples.items():
        print(f"e.g. {skill}: {rows[0]['prompt']!r} -> {rows[0]['answer']!r} (expected {rows[0]['expected']!r})")
    return 0


def add_eval_gen_arguments(parser: argparse.ArgumentParser) -> None:
    """--predictions in the official scripts' {prompt, label, predict} format, to compare with their output."""
    add_scored_data_arguments(parser, "JSONL in any fine-tuning format", batch_size=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--predictions", type=Path, default=None, help="write {prompt, label, predict} JSONL here")


def cmd_eval_gen(args: argparse.Namespace) -> int:
    """Score greedy answers against the references; the data is read before the model loads."""
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
