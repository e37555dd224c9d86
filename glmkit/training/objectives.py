"""Training examples for GLM: autoregressive blank infilling (pre-training) and chat answers (SFT).

GLM pre-trains by blanking spans out of a text (Part A) and regenerating them after it (Part B):

    Part A:  x1 x2 [MASK] x5 [MASK] x8          bidirectional, positions 0..len(A)-1
    Part B:  <sop> x3 x4  <sop> x6 x7           causal; each span sits at its [MASK]'s position,
    labels:   x3   x4 <eop> x6  x7 <eop>        its block positions count 1, 2, 3 ...

With [gMASK] the blank is the whole end of the text, which is exactly how ChatGLM is prompted
(`prompt [gMASK] <sop> answer <eop>`), so chat fine-tuning is the same example shape with the
prompt as Part A and the answer as Part B. All randomness comes from an explicit generator, so a
given (seed, step) always yields the same batch, which makes resumed training exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmkit.models.positions import SpecialIds, blocked_mask

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # labels[i] is what position i must predict; IGNORE for Part A
    positions: list[int]
    block_positions: list[int]
    context_length: int  # len(Part A): the bidirectional prefix


@dataclass(frozen=True)
class Specials:
    """Ids the objectives need beyond the ones positions use."""

    ids: SpecialIds
    eop: int


def part_b(spans: Sequence[Sequence[int]], mask_positions: Sequence[int], specials: Specials, start: int) -> Example:
    """Part B for the given spans, appended after a Part A of length `start`."""
    ids, labels, positions, blocks = [], [], [], []
    for span, mask_pos in zip(spans, mask_positions, strict=True):
        ids += [specials.ids.bos, *span]
        labels += [*span, specials.eop]
        positions += [mask_pos] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    return Example(ids, labels, positions, blocks, start)


def join(part_a: Sequence[int], b: Example) -> Example:
    n = len(part_a)
    return Example(
        input_ids=[*part_a, *b.input_ids],
        labels=[IGNORE] * n + b.labels,
        positions=list(range(n)) + b.positions,
        block_positions=[0] * n + b.block_positions,
        context_length=n,
    )


def gmask_example(tokens: Sequence[int], cut: int, specials: Specials) -> Example:
    """tokens[:cut] [gMASK] | <sop> tokens[cut:] <eop>: generate the end of the text."""
    part_a = [*tokens[:cut], specials.ids.gmask]
    return join(part_a, part_b([tokens[cut:]], [cut], specials, len(part_a)))


def span_example(tokens: Sequence[int], spans: Sequence[tuple[int, int]], specials: Specials) -> Example:
    """Blank out the given sorted, non-overlapping (start, end) spans with [MASK] and regenerate them."""
    part_a: list[int] = []
    mask_positions, contents = [], []
    cursor = 0
    for start, end in spans:
        part_a += tokens[cursor:start]
        mask_positions.append(len(part_a))
        part_a.append(specials.ids.mask)
        contents.append(tokens[start:end])
        cursor = end
    part_a += tokens[cursor:]
    return join(part_a, part_b(contents, mask_positions, specials, len(part_a)))


def sample_spans(length: int, ratio: float, mean_span: float, generator: torch.Generator) -> list[tuple[int, int]]:
    """Spans covering about `ratio` of the text, lengths ~ Poisson(mean_span) (GLM's recipe), in order."""
    budget = max(1, round(length * ratio))
    lengths: list[int] = []
    while sum(lengths) < budget:
        draw = int(torch.poisson(torch.tensor([mean_span]), generator=generator).item())
        lengths.append(max(1, min(draw, budget - sum(lengths))))
    free = length - sum(lengths)  # tokens left in Part A, distributed before/between the spans
    cuts = sorted(torch.randint(0, free + 1, (len(lengths),), generator=generator).tolist())
    spans, offset = [], 0
    for gap_end, span_len in zip(cuts, lengths, strict=True):
        start = gap_end + offset
        spans.append((start, start + span_len))
        offset += span_len
    return spans


def infilling_example(tokens: Sequence[int], specials: Specials, generator: torch.Generator,
                      gmask_prob: float = 0.5, mask_ratio: float = 0.15, mean_span: float = 3.0) -> Example:
    """One pre-training example: [gMASK] suffix generation or [MASK] span infilling, chosen at random."""
    if torch.rand((), generator=generator).item() < gmask_prob:
        cut = int(torch.randint(1, max(2, len(tokens) - 1), (), generator=generator))
        return gmask_example(tokens, cut, specials)
    return span_example(tokens, sample_spans(len(tokens), mask_ratio, mean_span, generator), specials)


def chat_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], specials: Specials) -> Example:
    """`prompt [gMASK] <sop> answer <eop>` with the loss on the answer only.

    `prompt_ids` is the encoded prompt *with* its `[gMASK] <sop>` (tokenizer.encode adds them), so
    training sees exactly the ids that chat() will feed the model."""
    if list(prompt_ids[-2:]) != [specials.ids.gmask, specials.ids.bos]:
        raise ValueError("chat prompts must end with [gMASK] <sop>; encode them with tokenizer.encode(prompt)")
    part_a = list(prompt_ids[:-1])
    return join(part_a, part_b([answer_ids], [len(part_a) - 1], specials, len(part_a)))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids/labels [B, L], position_ids [B, 2, L], attention_mask [B, 1, L, L]."""
    length = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    positions = torch.zeros(batch, 2, length, dtype=torch.long)
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        positions[row, 0, :n] = torch.tensor(e.positions)
        positions[row, 1, :n] = torch.tensor(e.block_positions)
        mask[row, 0, :n, :n] = blocked_mask(n, e.context_length)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
