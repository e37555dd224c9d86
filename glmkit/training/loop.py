"""The training loop: GLM pre-training by blank infilling, then chat fine-tuning (SFT).

One loop serves both stages; what differs is where a batch comes from (`Batches`). Everything a
step depends on is a pure function of (seed, step), and the checkpoint holds the model, the AdamW
state and the step, so a run that is stopped and resumed ends with the same weights as one that
never stopped. The learning-rate schedule (linear warm-up, cosine decay) is a function of the step
too, so it needs no state of its own.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from glmkit.checkpoints.files import CheckpointError, first_sentence, load_torch_file
from glmkit.models.glm import GLM
from glmkit.text.chat_format import CHATGLM_6B, ChatFormat
from glmkit.text.protocol import Tokenizer
from glmkit.training.objectives import IGNORE, Example, Specials, chat_example, collate, infilling_example

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seq_len: int = 256  # tokens of text per pre-training example; longest SFT example kept
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    seed: int = 0
    dtype: str = "float32"  # autocast dtype: float32 (off) or bfloat16
    extra: dict = field(default_factory=dict)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, micro: int) -> int:
    return seed * 1_000_003 + step * 1_009 + micro


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The randomness of one micro-batch, independent of everything that happened before it."""
    g = torch.Generator()
    g.manual_seed(step_seed(seed, step, micro))
    return g


class Batches:
    """A deterministic source of training batches: batch(step, micro) -> list of Examples."""

    def __init__(self, make: Callable[[int, int], list[Example]]):
        self.make = make

    def batch(self, step: int, micro: int) -> list[Example]:
        return self.make(step, micro)


def pretrain_batches(token_docs: Sequence[Sequence[int]], specials: Specials, config: TrainConfig) -> Batches:
    """Random windows of `seq_len` tokens from random documents, each turned into a GLM example."""
    docs = [d for d in token_docs if len(d) >= 8]
    if not docs:
        raise ValueError("no pre-training document has 8 or more tokens")
    weights = torch.tensor([float(len(d)) for d in docs])

    def make(step: int, micro: int) -> list[Example]:
        g = step_generator(config.seed, step, micro)
        out = []
        for i in torch.multinomial(weights, config.batch_size, replacement=True, generator=g).tolist():
            doc = docs[i]
            start = int(torch.randint(0, max(1, len(doc) - config.seq_len + 1), (), generator=g))
            out.append(infilling_example(doc[start:start + config.seq_len], specials, g))
        return out

    return Batches(make)


def sft_examples(records: Sequence[dict], tokenizer: Tokenizer, specials: Specials, max_len: int,
                 chat_format: ChatFormat = CHATGLM_6B) -> list[Example]:
    """Chat records ({prompt, response, history}) in the chat format; too-long ones are dropped."""
    out = []
    for r in records:
        history = [tuple(turn) for turn in r.get("history", [])]
        prompt_ids = chat_format.prompt_ids(tokenizer, r["prompt"], history)
        answer_ids = tokenizer.encode(r["response"], add_special_tokens=False)
        if len(prompt_ids) + len(answer_ids) + 1 <= max_len:
            out.append(chat_example(prompt_ids, answer_ids, specials))
    if not out:
        raise ValueError(f"no SFT example fits in {max_len} tokens")
    return out


def sft_batches(examples: Sequence[Example], config: TrainConfig) -> Batches:
    """Epochs over the examples, each in its own seeded order: batch k of a run is always the same.

    Within an epoch, examples are grouped into batches of similar length (sorted inside random
    chunks, batches then shuffled), so little compute goes to padding."""
    n = len(examples)
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:
        if epoch not in orders:
            g = torch.Generator().manual_seed(config.seed + epoch)
            perm = torch.randperm(n, generator=g).tolist()
            chunk = config.batch_size * 64
            batches = []
            for start in range(0, n, chunk):
                group = sorted(perm[start:start + chunk], key=lambda i: len(examples[i].input_ids))
                batches += [group[k:k + config.batch_size] for k in range(0, len(group), config.batch_size)]
            shuffled = torch.randperm(len(batches), generator=g).tolist()
            orders[epoch] = [i for b in shuffled for i in batches[b]]
        return orders[epoch]

    def make(step: int, micro: int) -> list[Example]:
        first = (step * config.grad_accum + micro) * config.batch_size
        return [examples[order(k // n)[k % n]] for k in range(first, first + config.batch_size)]

    return Batches(make)


def interleave(main: Batches, other: Batches, every: int) -> Batches:
    """`main`, except that every `every`-th step draws its batch from `other` (a replay mix)."""
    return Batches(lambda step, micro: (other if (step + 1) % every == 0 else main).batch(step, micro))


def loss_of(model: GLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labelled positions, and how many there were.

    The output layer runs on labelled positions only: in chat data most positions are prompt, and
    the vocabulary projection is a large share of a small model's compute."""
    hidden = model.transformer(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    labels = batch["labels"]
    scored = labels != IGNORE
    logits = model.lm_head(hidden[scored]).float()
    return F.cross_entropy(logits, labels[scored]), int(scored.sum())


def save_checkpoint(path: Path, model: GLM, optimizer: torch.optim.Optimizer, step: int, meta: dict) -> None:
    """Atomic: a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"model": trained, "optimizer": optimizer.state_dict(), "step": step, "meta": meta}, tmp)
    os.replace(tmp, path)


# Settings that do not change the weights a run ends with: they may differ when a run resumes.
FREE_ON_RESUME = ("eval_every", "eval_batches", "save_every")


class ResumeError(ValueError):
    """A checkpoint this run cannot resume from: unreadable, or written with other settings."""


def read_checkpoint(path: Path) -> dict:
    """checkpoint.pt's contents, or one line on why it cannot be resumed from."""
    try:
        state = load_torch_file(path, mmap=False)
    except CheckpointError:
        raise  # it holds objects glmkit will not unpickle, named
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ResumeError(f"cannot resume from {path}: it is truncated or corrupt ({first_sentence(e)}); pass "
                          "--force-restart to start over (or delete it)") from e
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise ResumeError(f"{path} is not a glmkit training checkpoint (no model, optimizer and step); pass "
                          "--force-restart to start over, or use another output directory")
    return state


def run_settings(config: TrainConfig, settings: dict | None = None) -> dict:
    """What a checkpoint records of the run, to compare when resuming: the training config and the caller's own
    settings (fine-tuning's method, lengths, adapter shape)."""
    return {"config": asdict(config), "settings": settings or {}}


def check_same_run(path: Path, saved: dict, current: dict) -> None:
    """Resuming with other settings would silently finish another run: name what differs."""
    differences = []
    for part in ("config", "settings"):
        old, new = saved.get(part) or {}, current.get(part) or {}
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key] and not (part == "config" and key in FREE_ON_RESUME):
                differences.append(f"{key} {old[key]!r} (now {new[key]!r})")
    if differences:
        raise ResumeError(f"{path} was written by a run with other settings: {', '.join(differences)}; rerun "
                          "with the checkpoint's settings to resume it, pass --force-restart to start over, or "
                          "use another output directory")


def discard_run(out_dir: Path) -> None:
    """Start over: the checkpoint and log of the run in out_dir go."""
    for name in (CHECKPOINT, "log.jsonl"):
        (out_dir / name).unlink(missing_ok=True)


def restore_trained(model: GLM, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's trained parameters; every parameter now training must be in it."""
    training = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(training - set(state))
    if missing:
        raise ValueError(f"{path} does not hold {missing[0]} (and {len(missing) - 1} more): it was written by a run "
                         "with other settings; use another output directory or delete the checkpoint")
    model.load_state_dict(state, strict=False)


def make_optimizer(model: GLM, config: TrainConfig) -> torch.optim.AdamW:
    """No weight decay on norms and biases (the usual rule)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def train(
    model: GLM,
    batches: Batches,
    config: TrainConfig,
    out_dir: Path,
    eval_batches: Batches | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    trainable: Callable[[str], bool] | None = None,
    settings: dict | None = None,
    restart: bool = False,
) -> dict:
    """Train in place, resuming from out_dir/checkpoint.pt when it exists; returns the final metrics.

    `trainable(name)` picks the parameters that learn (all by default); the rest stay frozen, and
    checkpoints hold the trained ones only, so an adapter's checkpoint is adapter-sized.
    stop_after ends the run early at that step (used to test that resuming is exact). A checkpoint written with
    other settings (`config`, and the caller's `settings`) is refused, naming them; `restart` discards it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    if restart:
        discard_run(out_dir)
    run = run_settings(config, settings)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter is selected for training")
    optimizer = make_optimizer(model, config)
    start = 0
    if ckpt_path.exists():
        state = read_checkpoint(ckpt_path)
        check_same_run(ckpt_path, state.get("meta") or {}, run)
        restore_trained(model, state["model"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    log = out_dir / "log.jsonl"
    metrics: dict = {"step": start}
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc="training", disable=not progress)
    tokens_seen, t0 = 0, time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = {k: v.to(model.device) for k, v in collate(batches.batch(step, micro), model.config.pad_token_id).items()}
            torch.manual_seed(step_seed(config.seed, step, micro))  # dropout too is a function of the step
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
                loss, _ = loss_of(model, batch)
            (loss / config.grad_accum).backward()
            loss_sum += loss.item() / config.grad_accum
            tokens_seen += int(batch["input_ids"].numel())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "loss": round(loss_sum, 4), "lr": config.lr_at(step),
                   "tokens_per_s": round(tokens_seen / (time.time() - t0))}
        if eval_batches is not None and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            metrics["eval_loss"] = round(evaluate_loss(model, eval_batches, config.eval_batches), 4)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=metrics["tokens_per_s"],
                        **({"eval": metrics["eval_loss"]} if "eval_loss" in metrics else {}))
        if (step + 1) % config.eval_every == 0 or "eval_loss" in metrics:
            with log.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if (step + 1) % config.save_every == 0 or step + 1 == end:
            save_checkpoint(ckpt_path, model, optimizer, step + 1, run)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return metrics


@torch.no_grad()
def evaluate_loss(model: GLM, batches: Batches, count: int) -> float:
    """Token-weighted mean loss over `count` fixed evaluation batches."""
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    for i in range(count):
        batch = {k: v.to(model.device) for k, v in collate(batches.batch(0, i), model.config.pad_token_id).items()}
        loss, n = loss_of(model, batch)
        total += loss.item() * n
        n_tokens += n
    model.train(was_training)
    return total / max(1, n_tokens)
