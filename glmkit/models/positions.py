"""GLM position ids and attention masks, derived from token ids.

GLM reads its prompt bidirectionally and generates causally. The boundary is the `<sop>` token:
everything before it (the context, ending with `[gMASK]` or holding a `[MASK]`) sees everything
else before it, and `<sop>` and what follows are causal. ChatGLM-6B adds a second position channel
(2D positions): generated tokens all share the mask token's position and count up in the second one.
GLM-130B has one channel (1D): after a `[MASK]` every generated token takes the mask's position,
after a `[gMASK]` positions simply count on.

The official code builds these in two places that disagree on padding (see the spec):
  * the model (`model_layout`): pads count as tokens, every column before `<sop>` is open, and
    `[gMASK]` wins over `[MASK]` when both are present;
  * the tokenizer's padding path (`padded_layout`): pads are hidden, get position 0, the real
    tokens' positions restart at 0, and `[MASK]` wins over `[gMASK]`.
Batched generation uses the tokenizer's path so that a padded prompt behaves like the prompt alone.

Masks here use the official convention: a bool tensor where True means *blocked*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpecialIds:
    """The token ids that shape positions and masks (they differ between vocabularies)."""

    bos: int  # <sop>: start of the generated part
    mask: int  # [MASK]: a short blank
    gmask: int  # [gMASK]: generate to the end
    pad: int


class MissingSopError(ValueError):
    """The input has no `<sop>`, so GLM cannot tell the context from the generated part."""


def context_length(ids: Sequence[int], special: SpecialIds, last: bool = False) -> int:
    """Index of `<sop>` (the first one, or with `last` the last one): the length of the bidirectional context."""
    ids = list(ids)
    if special.bos not in ids:
        raise MissingSopError(
            f"input ids contain no <sop> (id {special.bos}); GLM needs '[gMASK] <sop>' (or a [MASK] and <sop>) "
            "to know where generation starts. Encode prompts with tokenizer.encode(text) or tokenizer([text]), "
            "which append them."
        )
    return len(ids) - 1 - ids[::-1].index(special.bos) if last else ids.index(special.bos)


def mask_position(ids: Sequence[int], special: SpecialIds, prefer_gmask: bool) -> int:
    """Index of the mask token whose position the generated tokens take.

    With no mask token at all, generation continues from `<sop>`'s own index (the official code
    would crash; this keeps plain continuation usable)."""
    ids = list(ids)
    order = (special.gmask, special.mask) if prefer_gmask else (special.mask, special.gmask)
    for token in order:
        if token in ids:
            return ids.index(token)
    return context_length(ids, special)


def positions_2d(length: int, ctx: int, mask_pos: int) -> torch.Tensor:
    """[2, length]: row 0 the position (frozen at the mask from `<sop>` on), row 1 the block position."""
    position = torch.arange(length)
    position[ctx:] = mask_pos
    block = torch.zeros(length, dtype=torch.long)
    block[ctx:] = torch.arange(1, length - ctx + 1)
    return torch.stack([position, block])


def frozen_position_1d(ids: Sequence[int], special: SpecialIds) -> int | None:
    """GLM-130B (`generate.py`): a `[MASK]` in the context (before the last `<sop>`) wins over `[gMASK]`,
    and every position from `<sop>` on is the first `[MASK]`'s; None: positions count on (`[gMASK]`)."""
    ids = list(ids)
    ctx = context_length(ids, special, last=True)
    return ids.index(special.mask) if special.mask in ids[:ctx] else None


def positions_1d(length: int, ctx: int, frozen_at: int | None) -> torch.Tensor:
    """[1, length]: GLM-130B's positions, 0, 1, 2, ... with those from `<sop>` on set to `frozen_at` if given."""
    position = torch.arange(length)
    if frozen_at is not None:
        position[ctx:] = frozen_at
    return position.unsqueeze(0)


def position_step(ids: Sequence[int], special: SpecialIds, two_d: bool) -> list[int]:
    """How each position plane moves per generated token: 2D counts the block position; 1D counts the
    position unless a `[MASK]` froze it."""
    if two_d:
        return [0, 1]
    return [0 if frozen_position_1d(ids, special) is not None else 1]


def blocked_mask(length: int, ctx: int) -> torch.Tensor:
    """[length, length] bool, True = blocked: causal, with every column before `<sop>` open."""
    allowed = torch.ones(length, length).tril_().bool()
    allowed[:, :ctx] = True
    return ~allowed


def sequence_layout(
    ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool, two_d: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [P, L], blocked [L, L]) for one unpadded sequence.

    1D (GLM-130B) follows its `generate.py` whatever `prefer_gmask` says: the context runs up to the
    last `<sop>`, and `[MASK]` wins over `[gMASK]`."""
    if two_d:
        ctx = context_length(ids, special)
        positions = positions_2d(len(ids), ctx, mask_position(ids, special, prefer_gmask))
    else:
        ctx = context_length(ids, special, last=True)
        positions = positions_1d(len(ids), ctx, frozen_position_1d(ids, special))
    return positions, blocked_mask(len(ids), ctx)


def model_layout(input_ids: torch.Tensor, special: SpecialIds, two_d: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The official model's own derivation: (position_ids [B, P, L], attention_mask [B, 1, L, L]).

    Pads are treated as ordinary context tokens, exactly as the official code does."""
    layouts = [sequence_layout(row.tolist(), special, prefer_gmask=True, two_d=two_d) for row in input_ids]
    positions = torch.stack([p for p, _ in layouts]).to(input_ids.device)
    mask = torch.stack([m for _, m in layouts]).unsqueeze(1).to(input_ids.device)
    return positions, mask


def padded_layout(
    sequences: Sequence[Sequence[int]], special: SpecialIds, length: int | None = None, two_d: bool = True
) -> dict[str, torch.Tensor]:
    """Left-pad `sequences` the way the official tokenizer does.

    Returns input_ids [B, L], attention_mask [B, 1, L, L] (True = blocked; pad rows and columns
    blocked), position_ids [B, P, L] (pads at 0, real tokens counted from 0)."""
    length = max(len(s) for s in sequences) if length is None else length
    batch_ids, batch_mask, batch_pos = [], [], []
    for seq in sequences:
        if len(seq) > length:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit the padded length {length}")
        n_pad = length - len(seq)
        positions, blocked = sequence_layout(seq, special, prefer_gmask=False, two_d=two_d)
        mask = torch.ones(length, length, dtype=torch.bool)
        mask[n_pad:, n_pad:] = blocked
        batch_ids.append(torch.tensor([special.pad] * n_pad + list(seq), dtype=torch.long))
        batch_mask.append(mask)
        batch_pos.append(torch.nn.functional.pad(positions, (n_pad, 0)))
    return {
        "input_ids": torch.stack(batch_ids),
        "attention_mask": torch.stack(batch_mask).unsqueeze(1),
        "position_ids": torch.stack(batch_pos),
    }
