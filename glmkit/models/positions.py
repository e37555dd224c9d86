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

Each of these is a `PositionLayout` (2D prefix-LM, 1D prefix-LM, causal), chosen by the model family.
Masks here use the official convention: a bool tensor where True means *blocked*.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

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


def blocked_mask(length: int, ctx: int) -> torch.Tensor:
    """[length, length] bool, True = blocked: causal, with every column before `<sop>` open."""
    allowed = torch.ones(length, length).tril_().bool()
    allowed[:, :ctx] = True
    return ~allowed


class PositionLayout(Protocol):
    """How a family turns token ids into position ids and an attention mask: the one choice that differs
    between GLM generations, so callers ask the model's layout instead of branching on the family."""

    name: str
    planes: int  # position channels per token: 2 for ChatGLM-6B's 2D positions, else 1
    bidirectional: bool  # the prompt (up to `<sop>`) sees itself both ways; False: causal throughout

    def sequence(self, ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids [planes, L], blocked [L, L]) for one unpadded sequence."""
        ...

    def step(self, ids: Sequence[int], special: SpecialIds) -> list[int]:
        """How much each position plane moves per generated token after the prompt `ids`."""
        ...

    def blank_positions(self, context: int, length: int, blank: int, to_end: bool) -> torch.Tensor:
        """[planes, context + length]: a context of `context` tokens, then `length` tokens of the answer block
        for the blank at index `blank` (`to_end`: a `[gMASK]`, which generates to the end)."""
        ...


@dataclass(frozen=True)
class PrefixLM2D:
    """ChatGLM-6B: bidirectional up to `<sop>`, then causal; generated tokens keep the mask's position and
    count up in the second (block) plane."""

    name: str = "2d-prefix-lm"
    planes: int = 2
    bidirectional: bool = True

    def sequence(self, ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = context_length(ids, special)
        return positions_2d(len(ids), ctx, mask_position(ids, special, prefer_gmask)), blocked_mask(len(ids), ctx)

    def step(self, ids: Sequence[int], special: SpecialIds) -> list[int]:
        return [0, 1]

    def blank_positions(self, context: int, length: int, blank: int, to_end: bool) -> torch.Tensor:
        return positions_2d(context + length, context, blank)


@dataclass(frozen=True)
class PrefixLM1D:
    """GLM-130B (its `generate.py`, whatever `prefer_gmask` says): the context runs up to the last `<sop>`,
    `[MASK]` wins over `[gMASK]` and freezes the positions of what follows; after `[gMASK]` they count on."""

    name: str = "1d-prefix-lm"
    planes: int = 1
    bidirectional: bool = True

    def sequence(self, ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = context_length(ids, special, last=True)
        return positions_1d(len(ids), ctx, frozen_position_1d(ids, special)), blocked_mask(len(ids), ctx)

    def step(self, ids: Sequence[int], special: SpecialIds) -> list[int]:
        return [0 if frozen_position_1d(ids, special) is not None else 1]

    def blank_positions(self, context: int, length: int, blank: int, to_end: bool) -> torch.Tensor:
        return positions_1d(context + length, context, None if to_end else blank)


@dataclass(frozen=True)
class Causal:
    """Plain causal attention with positions 0, 1, 2, ... (ChatGLM2/3 and GLM-4): no special token shapes it."""

    name: str = "causal"
    planes: int = 1
    bidirectional: bool = False

    def sequence(self, ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        length = len(ids)
        return torch.arange(length).unsqueeze(0), blocked_mask(length, 0)

    def step(self, ids: Sequence[int], special: SpecialIds) -> list[int]:
        return [1]

    def blank_positions(self, context: int, length: int, blank: int, to_end: bool) -> torch.Tensor:
        raise ValueError("a causal model has no blanks to fill: blank infilling needs a GLM prefix-LM "
                         "(ChatGLM-6B or GLM-130B)")


PREFIX_LM_2D, PREFIX_LM_1D, CAUSAL = PrefixLM2D(), PrefixLM1D(), Causal()
LAYOUTS: dict[str, PositionLayout] = {layout.name: layout for layout in (PREFIX_LM_2D, PREFIX_LM_1D, CAUSAL)}


def sequence_layout(ids: Sequence[int], special: SpecialIds, *, prefer_gmask: bool,
                    layout: PositionLayout = PREFIX_LM_2D) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [P, L], blocked [L, L]) for one unpadded sequence, by `layout`."""
    return layout.sequence(ids, special, prefer_gmask=prefer_gmask)


def model_layout(input_ids: torch.Tensor, special: SpecialIds,
                 layout: PositionLayout = PREFIX_LM_2D) -> tuple[torch.Tensor, torch.Tensor]:
    """The official model's own derivation: (position_ids [B, P, L], attention_mask [B, 1, L, L]).

    Pads are treated as ordinary context tokens, exactly as the official code does."""
    layouts = [layout.sequence(row.tolist(), special, prefer_gmask=True) for row in input_ids]
    positions = torch.stack([p for p, _ in layouts]).to(input_ids.device)
    mask = torch.stack([m for _, m in layouts]).unsqueeze(1).to(input_ids.device)
    return positions, mask


def padded_layout(
    sequences: Sequence[Sequence[int]], special: SpecialIds, length: int | None = None,
    layout: PositionLayout = PREFIX_LM_2D,
) -> dict[str, torch.Tensor]:
    """Left-pad `sequences` the way the official tokenizer does.

    Returns input_ids [B, L], attention_mask [B, 1, L, L] (True = blocked; pad rows and columns
    blocked), position_ids [B, P, L] (pads at 0, real tokens counted from 0)."""
    return pad_layouts(sequences, lambda seq: layout.sequence(seq, special, prefer_gmask=False), special.pad, length)


def pad_layouts(
    sequences: Sequence[Sequence[int]],
    layout_of: Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
    pad: int,
    length: int | None = None,
) -> dict[str, torch.Tensor]:
    """padded_layout with each sequence's (position_ids [P, L], blocked [L, L]) from `layout_of` (embeddings read
    ids without <sop> as all context): every row is what it would be alone, behind pads that nothing sees."""
    length = max(len(s) for s in sequences) if length is None else length
    batch_ids, batch_mask, batch_pos = [], [], []
    for seq in sequences:
        if len(seq) > length:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit the padded length {length}")
        n_pad = length - len(seq)
        positions, blocked = layout_of(seq)
        mask = torch.ones(length, length, dtype=torch.bool)
        mask[n_pad:, n_pad:] = blocked
        batch_ids.append(torch.tensor([pad] * n_pad + list(seq), dtype=torch.long))
        batch_mask.append(mask)
        batch_pos.append(torch.nn.functional.pad(positions, (n_pad, 0)))
    return {
        "input_ids": torch.stack(batch_ids),
        "attention_mask": torch.stack(batch_mask).unsqueeze(1),
        "position_ids": torch.stack(batch_pos),
    }
