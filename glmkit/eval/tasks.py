"""Running one task: read its groups, score them in batches, turn the tallies into metrics.

Every runner returns a tally (sums and counts) rather than finished metrics, so groups pool into an
overall row exactly (an accuracy over all items, a perplexity over all tokens), not as an average
of averages.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from glmkit.eval.metrics import best_over_references, exact_match_score, f1_score
from glmkit.eval.scoring import (
    AnswerScore,
    Packed,
    context_prefix,
    generation_prompt,
    pack,
    packed_length,
    part_a,
    score_packed,
)
from glmkit.eval.task_config import METRICS, TaskConfig, TaskConfigError
from glmkit.eval.task_data import (
    ChoiceItem,
    Document,
    GenerationItem,
    LastWordItem,
    Reader,
    TaskDataError,
    is_document_file,
    json_records,
    read_choice_items,
    read_documents,
)
from glmkit.generation.generate import greedy_completions
from glmkit.models.glm import GLM
from glmkit.text.protocol import Tokenizer

Tally = Counter  # metric sums and counts, added up across files and groups
T = TypeVar("T")


@dataclass
class Result:
    task: str
    group: str
    metric: str
    value: float
    n: int  # examples (scored tokens for perplexity and bits per byte)


@dataclass
class Run:
    """What the runners share: the model, its context budget, batching and the progress bar."""

    model: GLM
    tokenizer: Tokenizer | None
    config: TaskConfig
    batch_size: int
    max_length: int
    progress: bool = True

    def pack(self, context: Sequence[int], answers: Sequence[Sequence[int]], where: str) -> Packed:
        """Pack one item, dropping the context's start if the row would not fit (as the official code does)."""
        special, layout = self.model.special_ids, self.model.position_layout
        ids = part_a(context, special, self.config.gmask, layout)
        keep = len(context_prefix(special, layout))  # a causal model's [gMASK] <sop> stays
        floor = keep or 1  # and a prefix-LM's mask token
        excess = packed_length(len(ids), answers, layout.bidirectional) - self.max_length
        if excess > 0:
            if excess > len(ids) - floor:
                need = packed_length(floor, answers, layout.bidirectional)
                raise TaskDataError(f"{where}: the answers take {need} tokens with the mask, more than the "
                                    f"{self.max_length}-token context; shorten them or raise max-seq-length")
            ids = [*ids[:keep], *ids[keep + excess:]]
        return pack(ids, answers, special, layout)

    def batches(self, items: Sequence[T], size: Callable[[T], int], desc: str):
        """(indices, items) batches, longest first so padding stays small; a progress bar over them."""
        order = sorted(range(len(items)), key=lambda i: -size(items[i]))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=f"{self.config.name} {desc}", disable=not self.progress, leave=False):
            rows = order[start:start + self.batch_size]
            yield rows, [items[i] for i in rows]

    def score(self, packed: Sequence[Packed], desc: str) -> list[list[AnswerScore]]:
        scores: list[list[AnswerScore]] = [[] for _ in packed]
        for rows, batch in self.batches(packed, lambda p: len(p.input_ids), desc):
            for i, result in zip(rows, score_packed(self.model, batch), strict=True):
                scores[i] = result
        return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def multiple_choice(run: Run, items: Sequence[ChoiceItem], desc: str) -> Tally:
    packed = [run.pack(item.context, item.choices, item.where) for item in items]
    tally = Tally(items=len(items))
    for item, scores in zip(items, run.score(packed, desc), strict=True):
        summed = [s.logprob for s in scores]
        per_char = [lp / max(1, chars) for lp, chars in zip(summed, item.choice_chars, strict=True)]
        tally["correct"] += _argmax(summed) == item.label
        tally["correct_per_token"] += _argmax([s.logprob / s.tokens for s in scores]) == item.label
        tally["correct_per_char"] += _argmax(per_char) == item.label
    return tally


def generation(run: Run, items: Sequence[GenerationItem], desc: str) -> Tally:
    if run.tokenizer is None:
        raise TaskConfigError("generation tasks need the model's tokenizer to compare answers as text")
    special, budget = run.model.special_ids, run.config.max_gen_length
    room = run.max_length - budget - 2
    if room < 1:
        raise TaskConfigError(f"{run.config.source}: max-gen-length {budget} leaves no room for a prompt in "
                              f"{run.max_length} tokens")
    layout = run.model.position_layout
    prompts = [generation_prompt(item.context[-room:], special, run.config.gmask, layout) for item in items]
    tally = Tally(items=len(items))
    eos = tuple({run.model.config.eos_token_id, run.tokenizer.eos_token_id})
    for rows, batch in run.batches(prompts, len, desc):
        for i, answer in zip(rows, greedy_completions(run.model, batch, budget, eos), strict=True):
            text = run.tokenizer.decode(answer)
            tally["em"] += best_over_references(exact_match_score, text, items[i].targets)
            tally["f1"] += best_over_references(f1_score, text, items[i].targets)
    return tally


def last_word(run: Run, items: Sequence[LastWordItem], desc: str) -> Tally:
    """LAMBADA's measure: the word is right when greedy decoding after the context produces all its tokens."""
    packed = [run.pack(item.context, [item.target], item.where) for item in items]
    scores = run.score(packed, desc)
    return Tally(last_word_items=len(items), last_word_correct=sum(s[0].greedy for s in scores))


def windows(tokens: Sequence[int], max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """GLM-130B's sliding windows as (context, scored) pairs. A window holds max_length - 1 text
    tokens plus the mask (`context [gMASK] <sop> scored[:-1]`). The first scores all of its tokens
    from nothing; each next one moves by `stride` and scores the `stride` tokens after the previous
    window, seeing the max_length - 1 - stride tokens before them bidirectionally."""
    span = max_length - 1
    if stride >= span and len(tokens) > span:
        raise TaskConfigError(f"generation-length {stride} must be less than max-seq-length - 1 = {span} "
                              "for the windows to overlap")
    out = [([], list(tokens[:span]))]
    start = span
    while start < len(tokens):
        out.append((list(tokens[start + stride - span:start]), list(tokens[start:start + stride])))
        start += stride
    return out


def perplexity(run: Run, documents: Sequence[Document], desc: str) -> Tally:
    """Summed negative log-likelihood of every token, each scored once, in sliding [gMASK] windows."""
    pairs = [w for d in documents for w in windows(d.tokens, run.max_length, run.config.generation_length)]
    packed = [run.pack(context, [scored], desc) for context, scored in pairs]
    nll = -sum(s[0].logprob for s in run.score(packed, desc))
    return Tally(nll=nll, tokens=sum(len(d.tokens) for d in documents), words=sum(d.words for d in documents),
                 bytes=sum(d.bytes for d in documents))


def merge(tallies: Iterable[Tally]) -> Tally:
    """Sum tallies, keeping zeros (Counter's `+` would drop them, and a score of 0 with them)."""
    total = Tally()
    for tally in tallies:
        total.update(tally)
    return total


def metrics_of(tally: Tally) -> dict[str, tuple[float, int]]:
    """metric -> (value, n) for whatever the tally holds."""
    out = {}
    if tally["items"] and "correct" in tally:
        n = tally["items"]
        for metric, key in (("accuracy", "correct"), ("accuracy_per_token", "correct_per_token"),
                            ("accuracy_per_char", "correct_per_char")):
            out[metric] = (100 * tally[key] / n, n)
    if tally["items"] and "em" in tally:
        out["em"] = (100 * tally["em"] / tally["items"], tally["items"])
        out["f1"] = (100 * tally["f1"] / tally["items"], tally["items"])
    if tally["tokens"]:
        out["ppl_word"] = (math.exp(min(700.0, tally["nll"] / tally["words"])), tally["tokens"])
        out["ppl_token"] = (math.exp(min(700.0, tally["nll"] / tally["tokens"])), tally["tokens"])
        out["bpb"] = (tally["nll"] / math.log(2) / tally["bytes"], tally["tokens"])
    if tally["last_word_items"]:
        out["last_word_accuracy"] = (100 * tally["last_word_correct"] / tally["last_word_items"],
                                     tally["last_word_items"])
    return out


def run_file(run: Run, path: Path, reader: Reader, limit: int | None, desc: str) -> Tally:
    kind = run.config.type
    if kind == "mul":
        items = read_choice_items(path, reader, run.config.csv_choices, run.config.few_shot)
        return multiple_choice(run, _some(items, limit, path), desc)
    if path.suffix == ".csv":
        raise TaskDataError(f"{path}: CSV files are multiple choice (MMLU / C-Eval); use type: mul")
    if kind == "lm" and is_document_file(path):  # --limit counts documents (a text file is one)
        return perplexity(run, _some(read_documents(path, reader), limit, path), desc)
    if kind == "lm" or path.suffix in (".json", ".jsonl"):
        records = _some(list(json_records(path)), limit, path)
        if kind == "gen":
            return generation(run, [reader.generation_item(r, where) for where, r in records], desc)
        return last_word(run, [reader.last_word_item(r, where) for where, r in records], desc)
    raise TaskDataError(f"{path}: generation tasks read JSONL files (.jsonl or .json)")


def _some(items: list[T], limit: int | None, path: Path) -> list[T]:
    if not items:
        raise TaskDataError(f"{path}: no examples in the file")
    return items[:limit]


def evaluate_task(model: GLM, tokenizer: Tokenizer | None, config: TaskConfig, *,
                  batch_size: int | None = None, limit: int | None = None, progress: bool = True) -> list[Result]:
    """Result rows per group (and an "all" row pooling them when there are several)."""
    context = model.config.max_sequence_length
    max_length = min(config.max_seq_length or 2048, context)
    if config.max_seq_length and config.max_seq_length > context:
        raise TaskConfigError(f"{config.source}: max-seq-length {config.max_seq_length} exceeds the model's "
                              f"context of {context} tokens")
    run = Run(model, tokenizer, config, batch_size or config.micro_batch_size, max_length, progress)
    reader = Reader(tokenizer)
    tallies = {group: merge(run_file(run, f, reader, limit, group) for f in files)
               for group, files in config.groups().items()}
    if len(tallies) > 1:
        tallies["all"] = merge(tallies.values())
    wanted = config.metrics or list(METRICS[config.type])
    return [Result(config.name, group, metric, value, n)
            for group, tally in tallies.items()
            for metric, (value, n) in metrics_of(tally).items() if metric in wanted]
