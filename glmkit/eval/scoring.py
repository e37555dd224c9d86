"""Log-probabilities of answers given a context, several answers packed into one sequence.

GLM-130B scores multiple choice this way (`evaluation/dataset.py`, `model.py: cond_log_prob`):

    tokens:  c1 c2 ... cn [MASK] | <sop> a1 a2 | <sop> b1 b2 b3 | <sop> d1
    sees:    part A, bidirectional | part A + own block, causal  (one block per choice)
    scores:                          a1 a2 <- predicted at <sop> a1, and so on per block

Each block takes the positions the answer would have if it were generated alone after part A:
under 2D positions (ChatGLM-6B) the mask's position and block positions 1, 2, ...; under 1D
(GLM-130B) the mask's position for every token with [MASK], increasing positions with [gMASK].
Those come from the model's `PositionLayout`, the model's own derivation, applied to part A plus
that one block, so a packed answer scores what it scores alone. Choices of one token share a
single `<sop>` (the official shortcut). Rows are right-padded; real tokens never see pads.

A causal GLM (ChatGLM2/3, GLM-4) reads `[gMASK] <sop> c1 ... cn` left to right, as its prompts start.
There the context is causal too, and the context's last token opens every block (it predicts a1):

    tokens:  [gMASK] <sop> c1 ... c(n-1) | cn a1 | cn b1 b2 | cn d1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmkit.models.glm import GLM
from glmkit.models.positions import PREFIX_LM_2D, PositionLayout, SpecialIds


@dataclass
class Packed:
    """One row: part A, then blocks; `scored` says what each answer's tokens are and where its block starts."""

    input_ids: list[int]
    positions: torch.Tensor  # [P, L]
    context_length: int  # len(part A)
    spans: list[tuple[int, int]]  # (start, length) of each causal block
    scored: list[tuple[int, list[int]]]  # (start of the answer's block, the answer's tokens)
    bidirectional: bool = True  # part A sees itself both ways (a prefix-LM); False: causal throughout


@dataclass
class AnswerScore:
    logprob: float  # summed over the answer's tokens
    tokens: int
    greedy: bool  # every answer token is the model's top choice (greedy decoding would produce it)


def context_prefix(special: SpecialIds, layout: PositionLayout) -> list[int]:
    """What a causal GLM's prompts start with (`[gMASK] <sop>`); a prefix-LM's context starts bare."""
    return [] if layout.bidirectional else [special.gmask, special.bos]


def part_a(context: Sequence[int], special: SpecialIds, gmask: bool, layout: PositionLayout = PREFIX_LM_2D) -> list[int]:
    """A prefix-LM's context closed by its mask token (a context holding a [MASK] already, blank filling, is
    kept); a causal GLM's context after its prompt prefix."""
    if not layout.bidirectional:
        return [*context_prefix(special, layout), *context]
    if not gmask and special.mask in context:
        return list(context)
    return [*context, special.gmask if gmask else special.mask]


def generation_prompt(context: Sequence[int], special: SpecialIds, gmask: bool, layout: PositionLayout) -> list[int]:
    """The prompt to generate an answer after: part A, then `<sop>` where the layout needs one to start."""
    ids = part_a(context, special, gmask, layout)
    return [*ids, special.bos] if layout.bidirectional else ids


def packed_length(context_length: int, answers: Sequence[Sequence[int]], bidirectional: bool = True) -> int:
    """Tokens a packed row takes: part A (context + mask) and the blocks (`<sop> answer[:-1]` each); a causal
    row's blocks open with part A's last token, one fewer."""
    blocks = 1 if all(len(a) == 1 for a in answers) else sum(len(a) for a in answers)
    return context_length + blocks - (not bidirectional)


def pack(part_a_ids: Sequence[int], answers: Sequence[Sequence[int]], special: SpecialIds,
         layout: PositionLayout) -> Packed:
    # A prefix-LM opens each block with <sop>; a causal model with the context's last token, which predicts a1.
    opener = special.bos if layout.bidirectional else part_a_ids[-1]
    part_a_ids = part_a_ids if layout.bidirectional else part_a_ids[:-1]
    ctx = len(part_a_ids)
    single = all(len(a) == 1 for a in answers)
    blocks = [[opener]] if single else [[opener, *a[:-1]] for a in answers]
    ids, spans, parts = list(part_a_ids), [], []
    for block in blocks:
        # The layout of part A + this block alone; its block columns are this block's positions.
        positions, _ = layout.sequence([*part_a_ids, *block], special, prefer_gmask=True)
        if not parts:
            parts.append(positions[:, :ctx])
        parts.append(positions[:, ctx:])
        spans.append((len(ids), len(block)))
        ids += block
    starts = [spans[0][0]] * len(answers) if single else [start for start, _ in spans]
    scored = [(start, list(a)) for start, a in zip(starts, answers, strict=True)]
    return Packed(ids, torch.cat(parts, dim=1), ctx, spans, scored, layout.bidirectional)


def collate(rows: Sequence[Packed], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids [B, L], position_ids [B, P, L], attention_mask [B, 1, L, L] (True = blocked)."""
    length = max(len(r.input_ids) for r in rows)
    channels = rows[0].positions.shape[0]
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), channels, length, dtype=torch.long)
    allowed = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        positions[i, :, :n] = row.positions
        allowed[i, 0, :n, : row.context_length] = True
        if not row.bidirectional:
            ctx = row.context_length
            allowed[i, 0, :ctx, :ctx] = torch.ones(ctx, ctx, dtype=torch.bool).tril()
        for start, size in row.spans:
            allowed[i, 0, start:start + size, start:start + size] = torch.ones(size, size, dtype=torch.bool).tril()
    return {"input_ids": ids, "position_ids": positions, "attention_mask": ~allowed}


@torch.inference_mode()
def score_packed(model: GLM, rows: Sequence[Packed]) -> list[list[AnswerScore]]:
    """Each row's answers scored in one forward pass over the batch."""
    batch = {k: v.to(model.device) for k, v in collate(rows, model.config.pad_token_id).items()}
    logits = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"]).logits  # [B, L, V]
    out = []
    for i, row in enumerate(rows):
        scores = []
        for start, answer in row.scored:
            n = len(answer)
            logprobs = logits[i, start:start + n].float().log_softmax(-1)  # [n, V]
            target = torch.tensor(answer, device=logprobs.device)
            picked = logprobs[torch.arange(n, device=logprobs.device), target]
            greedy = bool((logprobs.argmax(-1) == target).all())
            scores.append(AnswerScore(float(picked.sum()), len(answer), greedy))
        out.append(scores)
    return out
