"""The commands that make models: the demo recipe (`data build|tasks`, `train pretrain|sft`, `demo build`) and
`finetune` of any chat model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glmkit.cli.common import add_model_args, load_from_args


def add_data_build_arguments(parser: argparse.ArgumentParser) -> None:
    """--tiny: the tests build the whole pipeline on a slice."""
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--tiny", action="store_true", help="a small slice (for tests)")
    parser.add_argument("--seed", type=int, default=0)


def cmd_data_build(args: argparse.Namespace) -> int:
    """Build the corpus and chat data; print what was built, as JSON."""
    from glmkit.training.data.build import build_dataset

    print(json.dumps(build_dataset(args.out, tiny=args.tiny, seed=args.seed), indent=2, ensure_ascii=False))
    return 0


def add_data_tasks_arguments(parser: argparse.ArgumentParser) -> None:
    """--out defaults to the package's tasks folder: rebuilding the shipped tasks is the usual run."""
    parser.add_argument("--data", type=Path, required=True, help="a directory written by 'glmkit data build'")
    parser.add_argument("--out", type=Path, default=Path("glmkit/assets/tasks"), help="where the tasks go")
    parser.add_argument("--seed", type=int, default=0)


def cmd_data_tasks(args: argparse.Namespace) -> int:
    """Write the evaluation tasks from the held-out part of built data; print what was written, as JSON."""
    from glmkit.eval.shipped import build_tasks

    print(json.dumps(build_tasks(args.data, args.out, seed=args.seed), indent=2))
    return 0


TRAIN_OVERRIDES = ("steps", "batch_size", "grad_accum", "lr", "seq_len", "seed", "dtype")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every training option defaults to None: the recipe's value, unless a flag overrides it."""
    parser.add_argument("stage", choices=["pretrain", "sft"])
    parser.add_argument("--data", type=Path, required=True, help="a directory written by 'glmkit data build'")
    parser.add_argument("--tokenizer", type=Path, required=True, help="directory holding ice_text.model")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, log, model/)")
    parser.add_argument("--init", type=Path, help="model to fine-tune (sft)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model shape and schedule")
    for flag, kind in (("steps", int), ("batch-size", int), ("grad-accum", int), ("lr", float), ("seq-len", int),
                       ("seed", int)):
        parser.add_argument(f"--{flag}", type=kind, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="autocast dtype")
    add_force_restart(parser, "OUT/STAGE")


def add_force_restart(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--force-restart", action="store_true",
                        help=f"start over: discard the checkpoint in {where} instead of resuming from it (a "
                             "checkpoint written with other training settings is refused without this)")


def recipe_from(args: argparse.Namespace):
    """The demo recipe (or its tiny slice), with the stage's training options overridden from flags."""
    import dataclasses

    from glmkit.training.demo import FULL, TINY

    recipe = dataclasses.replace(TINY if args.tiny else FULL)
    stage = getattr(recipe, args.stage)
    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES if getattr(args, k) is not None}
    setattr(recipe, args.stage, dataclasses.replace(stage, **overrides))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    """One stage; it resumes from OUT/checkpoint.pt, so a stopped run is rerun, not restarted."""
    from glmkit.text.tokenizer import ChatGLMTokenizer
    from glmkit.training.demo import stage_pretrain, stage_sft

    recipe = recipe_from(args)
    tokenizer = ChatGLMTokenizer.from_pretrained(args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.force_restart:
        discard_stage(args.out / args.stage)
    if args.stage == "pretrain":
        model_dir = stage_pretrain(args.out, args.data, tokenizer, recipe, progress=True)
    else:
        if args.init is None:
            raise ValueError("sft needs --init MODEL_DIR (the pre-trained model to fine-tune)")
        model_dir = stage_sft(args.out, args.data, args.init, tokenizer, recipe, progress=True)
    print(f"model written to {model_dir}")
    return 0


def discard_stage(stage_dir: Path) -> None:
    """--force-restart: the stage's checkpoint, log and finished model go, so that it trains from step 0."""
    import shutil

    from glmkit.training.loop import discard_run

    discard_run(stage_dir)
    if (stage_dir / "model").is_dir():
        shutil.rmtree(stage_dir / "model")


DEMO_MODELS = ("demo-model", "glm4-demo")


def add_demo_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The defaults rebuild the shipped model in place, keeping the stages' results under runs/<model>."""
    parser.add_argument("--model", choices=DEMO_MODELS, default="demo-model",
                        help="which shipped model: demo-model (ChatGLM-6B architecture, the default) or glm4-demo "
                             "(GLM-4 architecture, trained to call tools)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where stages keep their results (default: runs/demo, runs/glm4-demo)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the exported model (default: glmkit/assets/demo-model, glmkit/assets/glm4-demo)")
    parser.add_argument("--tiny", action="store_true", help="the whole pipeline on a small slice, in minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for training (default: PyTorch's choice; 1 is faster when another job "
                             "keeps the other cores busy)")


def cmd_demo_build(args: argparse.Namespace) -> int:
    """Run every stage; print the build report, with the accuracies but not the sample answers."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.model == "glm4-demo":
        from glmkit.training.tool_demo import build_tool_demo

        out = args.out or Path("glmkit/assets/glm4-demo")
        report = build_tool_demo(args.work or Path("runs/glm4-demo"), out, tiny=args.tiny, seed=args.seed)
        print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=2, ensure_ascii=False))
        print(f"model written to {out}")
        return 0
    from glmkit.training.demo import build_demo

    out = args.out or Path("glmkit/assets/demo-model")
    report = build_demo(args.work or Path("runs/demo"), out, tiny=args.tiny, seed=args.seed)
    accuracy = {k: v for k, v in report["exact_match"].items() if k != "samples"}
    print(json.dumps({k: v for k, v in report.items() if k != "exact_match"} | {"exact_match": accuracy},
                     indent=2, ensure_ascii=False))
    print(f"model written to {out}")
    return 0


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The official P-Tuning scripts' options under their names, so that their recipes carry over."""
    add_model_args(parser)
    parser.add_argument("--data", type=Path, required=True, help="training JSONL")
    parser.add_argument("--eval", type=Path, default=None, help="held-out JSONL: eval loss every --eval-every steps")
    parser.add_argument("--method", choices=["ptuning", "lora", "full"], default="lora")
    parser.add_argument("--output", "-o", type=Path, required=True, help="adapter/model and checkpoints go here")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the data when --steps is not given")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: ptuning 2e-2, lora 1e-3, "
                                                               "full 1e-4); cosine decay to a tenth of it")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (mixed precision)")
    parser.add_argument("--max-source-length", type=int, default=None,
                        help="prompt tokens kept, history included (default: min(512, context - target))")
    parser.add_argument("--max-target-length", type=int, default=None,
                        help="answer tokens kept; longer ones are cut with a warning (default: min(256, context / 4))")
    add_adapter_method_args(parser)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (resume point)")
    parser.add_argument("--seed", type=int, default=0)
    add_force_restart(parser, "--output")


def add_adapter_method_args(parser: argparse.ArgumentParser) -> None:
    """Each method's own options, in a help section per method: they mean nothing to the others."""
    group = parser.add_argument_group("P-Tuning v2")
    group.add_argument("--pre-seq-len", type=int, default=128, help="prefix tokens (official recipe: 128)")
    group.add_argument("--prefix-projection", action="store_true", help="an MLP over the prefix embedding")
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=int, default=8, help="rank (default 8)")
    group.add_argument("--lora-alpha", type=int, default=32, help="scale alpha / r (default 32)")
    group.add_argument("--lora-dropout", type=float, default=0.1)
    group.add_argument("--lora-target", default="query_key_value",
                       help="comma-separated module names (default query_key_value; the block linears are "
                            "query_key_value, dense, dense_h_to_4h, dense_4h_to_h)")


def finetune_config(args: argparse.Namespace, context: int, examples: int):
    """The FinetuneConfig the flags describe; lengths, steps and the learning rate default from the model's
    context, the data's size and the method."""
    import math

    from glmkit.peft.adapters import LoraConfig
    from glmkit.training.finetune import DEFAULT_LR, FinetuneConfig
    from glmkit.training.loop import TrainConfig

    target = args.max_target_length or min(256, context // 4)
    source = args.max_source_length or min(512, context - target)
    steps = args.steps or math.ceil(args.epochs * examples / (args.batch_size * args.grad_accum))
    lr = args.lr or DEFAULT_LR[args.method]
    train = TrainConfig(steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr, min_lr=lr / 10,
                        warmup_steps=args.warmup_steps, weight_decay=0.0 if args.method != "full" else 0.01,
                        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                        seed=args.seed, dtype="bfloat16" if args.bf16 else "float32",
                        seq_len=source + target)
    return FinetuneConfig(method=args.method, train=train, max_source_length=source, max_target_length=target,
                          pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection,
                          lora=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                          target_modules=args.lora_target.split(",")))


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a new adapter (or the whole model) on --model; the data is read before the model loads: typos fail fast."""
    from glmkit.training.finetune import finetune, read_chat_records

    if args.adapter is not None:
        raise ValueError("finetune trains a new adapter on --model; to go on training one, rerun the command that "
                         "started it (it resumes from its output directory)")
    if args.tp > 1:
        raise ValueError("finetune runs in one process; --tp is for inference (generate, chat, serve, eval)")
    train_records = read_chat_records(args.data)
    eval_records = read_chat_records(args.eval) if args.eval else None
    model, tokenizer = load_from_args(args)
    config = finetune_config(args, model.config.max_sequence_length, len(train_records))
    train = config.train
    print(f"glmkit: {args.method} on {len(train_records)} examples, {train.steps} steps of {args.batch_size}"
          f"{f' x {args.grad_accum}' if args.grad_accum > 1 else ''}, lr {train.lr:g}", flush=True)
    metrics = finetune(model, tokenizer, train_records, args.output, config, eval_records,
                       restart=args.force_restart)
    print(json.dumps(metrics))
    what = "model" if args.method == "full" else "adapter"
    use = f"--model {args.output}" if args.method == "full" else f"--model {args.model or '(default)'} --adapter {args.output}"
    print(f"glmkit: {what} written to {args.output}; chat with it: glmkit chat {use}")
    return 0
