"""Blank infilling: fill `[MASK]` (a short span), `[sMASK]` (a sentence) and `[gMASK]` (the rest) in a text.

The text with its blanks is Part A, encoded once, bidirectionally, into the KV cache. The blanks are then
filled left to right as Part-B blocks appended to the same cache, exactly the layout GLM is pre-trained on
(glmkit/training/objectives.py):

    Part A:  x1 [MASK] x3 [gMASK]              bidirectional, positions 0..n-1
    Part B:  <sop> s1 s2  <sop> g1 g2 ...      causal; each block sees Part A and the blocks before it

so each answer is visible to the next blank and the context is never re-encoded (GLM-130B's own script
instead splices each answer into the text and encodes everything again). A block ends at `<eop>`, which
is not fed back: the next block's `<sop>` follows the last span token, as in training.

Positions of block token j (j = 0 is `<sop>`) for the blank at index m of Part A:
  * 2D (ChatGLM-6B): (m, j + 1) for every kind of blank;
  * 1D (GLM-130B): m for `[MASK]`/`[sMASK]`; n + j for `[gMASK]` (positions keep counting after Part A).
As in GLM-130B and the first ChatGLM-6B tokenizer, a text that does not end with a blank gets the
end-of-text token `</s>` after it, so the model knows the text stops there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmkit.generation.beam import search
from glmkit.generation.chat import Tokenizer
from glmkit.generation.generate import ban_tokens, make_generator, process_logits, sample
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

BLANK = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")


class NoBlankError(ValueError):
    """The text has nothing to fill."""


@dataclass(frozen=True)
class BlankIds:
    """The token ids infilling needs; `end_of_text` None appends nothing after the text."""

    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    end_of_text: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> BlankIds:
        return cls(mask=tokenizer.mask_token_id, smask=tokenizer.smask_token_id, gmask=tokenizer.gmask_token_id,
                   sop=tokenizer.bos_token_id, eop=tokenizer.eos_token_id,
                   end_of_text=tokenizer.convert_tokens_to_ids("</s>"))

    def marker(self, text: str) -> int:
        return {"[MASK]": self.mask, "[sMASK]": self.smask, "[gMASK]": self.gmask}[text]


@dataclass
class Filled:
    text: str  # the text with every blank replaced by its answer
    answers: list[str]  # one per blank, in order


class Infill:
    """One infilling run: Part A in the cache, then one block per blank; `length` is the cache fill."""

    def __init__(self, model: GLM, part_a: list[int], ids: BlankIds, params: SamplingParams) -> None:
        self.model, self.part_a, self.ids, self.params = model, part_a, ids, params
        self.length = 0
        self.eos = list(params.eos_token_ids) or [ids.eop]
        self.seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=model.device)
        self.seen[0, part_a] = True
        self.generator = make_generator(params.seed, model.device)

    def layout(self, blank: int, length: int) -> torch.Tensor:
        """[P, n + length]: positions of Part A followed by `length` tokens of the block for the blank at
        index `blank`, as glmkit.models.positions lays out a prompt whose only blank is that one."""
        to_end = self.part_a[blank] == self.ids.gmask
        positions = self.model.position_layout.blank_positions(len(self.part_a), length, blank, to_end)
        return positions.to(self.model.device)

    def context_positions(self) -> torch.Tensor:
        """[1, P, n]: Part A counts 0..n-1 (block position 0 under 2D)."""
        return self.layout(0, 0)[None]

    def positions(self, blank: int, first: int, count: int) -> torch.Tensor:
        """[1, P, count]: positions of tokens first..first+count-1 of the block for the blank at index `blank`."""
        return self.layout(blank, first + count)[None, :, len(self.part_a) + first:]

    def feed(self, tokens: torch.Tensor, positions: torch.Tensor, bidirectional: bool = False) -> torch.Tensor:
        """Write tokens [R, S] at the end of the cache; return the last logits [R, V]."""
        rows, count = tokens.shape
        blocked = torch.zeros(rows, 1, count, self.length + count, dtype=torch.bool, device=tokens.device)
        if not bidirectional:  # new tokens do not see the new tokens after them
            blocked[..., self.length:] = torch.ones(count, count, dtype=torch.bool, device=tokens.device).triu(1)
        out = self.model(tokens, positions, blocked, cache_position=self.length, last_only=True)
        self.length += count
        return out.logits[:, -1].float()

    def start_block(self, blank: int, pending: list[int], previous: tuple[int, int] | None) -> torch.Tensor:
        """Feed the previous block's unfed last tokens and this block's `<sop>` in one pass.

        `previous` is (blank index, span length) of the block `pending` ends."""
        positions = [self.positions(blank, 0, 1)]
        if pending:
            prev_blank, span_length = previous
            positions.insert(0, self.positions(prev_blank, span_length - len(pending) + 1, len(pending)))
        tokens = torch.tensor([[*pending, self.ids.sop]], device=self.model.device)
        return self.feed(tokens, torch.cat(positions, dim=-1))

    def sample_span(self, logits: torch.Tensor, blank: int, budget: int) -> tuple[list[int], list[int]]:
        """(span, its unfed tail) by greedy decoding or sampling, token by token into the cache."""
        span: list[int] = []
        for _ in range(budget):
            scores = ban_tokens(process_logits(logits, self.seen, self.params), [span], self.params, self.eos)
            token = int(sample(scores, self.params, self.generator)[0])
            if token in self.eos:
                return span, []
            span.append(token)
            self.seen[0, token] = True
            if len(span) == budget:
                break
            logits = self.feed(torch.tensor([[token]], device=self.model.device), self.positions(blank, len(span), 1))
        return span, span[-1:]

    def beam_span(self, logits: torch.Tensor, blank: int, budget: int) -> tuple[list[int], list[int]]:
        """(best beam's span, all of it): beams fork cache rows, then the cache is rewound to the `<sop>`
        and the winner is fed again with the next block's `<sop>` (one pass over the span, not the text)."""
        start = self.length

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            self.model.select_kv_cache_rows(parents, self.length)
            positions = self.positions(blank, self.length - start + 1, 1).expand(len(tokens), -1, -1)
            return self.feed(tokens[:, None], positions)

        best = search(logits, step, self.seen, self.params, budget, self.eos)[0]
        self.length = start
        span = [t for t in best.tokens if t not in self.eos]
        self.seen[0, span] = True
        return span, span

    def run(self, blanks: list[int]) -> list[list[int]]:
        context = self.model.config.max_sequence_length
        self.feed(torch.tensor([self.part_a], device=self.model.device), self.context_positions(), bidirectional=True)
        spans: list[list[int]] = []
        pending: list[int] = []
        fill = self.beam_span if self.params.num_beams > 1 else self.sample_span
        for k, blank in enumerate(blanks):
            try:
                budget = self.params.new_token_budget(self.length + len(pending) + 1, context)
            except ValueError as e:
                raise ValueError(f"no room left for blank {k + 1} of {len(blanks)}: {e}") from None
            previous = (blanks[k - 1], len(spans[-1])) if k else None
            span, pending = fill(self.start_block(blank, pending, previous), blank, budget)
            spans.append(span)
        return spans


def blank_indices(part_a: Sequence[int], ids: BlankIds) -> list[int]:
    return [i for i, t in enumerate(part_a) if t in (ids.mask, ids.smask, ids.gmask)]


def fill_ids(model: GLM, context: Sequence[int], ids: BlankIds, params: SamplingParams) -> list[list[int]]:
    """The answer (token ids, without `<eop>`) of every blank in `context`, in order.

    `context` is the text's ids with blank tokens in it (no `<sop>`); `params.max_new_tokens` bounds
    each answer, `max_length` the whole sequence (text plus every block)."""
    part_a = list(context)
    blanks = blank_indices(part_a, ids)
    if not blanks:
        raise NoBlankError("the text has no blank to fill: put [MASK] (a short span), [sMASK] (a sentence) or "
                           "[gMASK] (the rest of the text) where the answer goes")
    if ids.end_of_text is not None and blanks[-1] != len(part_a) - 1:
        part_a.append(ids.end_of_text)
    room = model.config.max_sequence_length
    if len(part_a) + len(blanks) >= room:
        raise ValueError(f"the text has {len(part_a)} tokens and {len(blanks)} blank(s), which leaves no room in the "
                         f"model's context ({room} tokens); shorten the text")
    per_blank = params.max_new_tokens or room
    model.setup_kv_cache(params.num_beams, min(room, len(part_a) + len(blanks) * (1 + per_blank)))
    try:
        with torch.inference_mode():
            return Infill(model, part_a, ids, params).run(blanks)
    finally:
        model.clear_kv_cache()


def encode_text(tokenizer: Tokenizer, text: str, ids: BlankIds) -> list[int]:
    """The text's ids with the blank markers as blank tokens (typed control tokens are never produced by
    the tokenizer itself, so the markers are split out here, as GLM-130B's script does)."""
    pieces, markers = BLANK.split(text), BLANK.findall(text)
    space = tokenizer.convert_tokens_to_ids("▁")
    out: list[int] = []
    for i, piece in enumerate(pieces):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        if i and piece_ids[:1] == [space] and not piece[:1].isspace():
            piece_ids = piece_ids[1:]  # SentencePiece's dummy prefix: the text goes on from the blank, no space
        out += piece_ids
        if i < len(markers):
            out.append(ids.marker(markers[i]))
    return out


def fill_text(model: GLM, tokenizer: Tokenizer, text: str, params: SamplingParams) -> Filled:
    """Fill every blank marker in `text`; the answers are spliced into the text as written."""
    ids = BlankIds.from_tokenizer(tokenizer)
    spans = fill_ids(model, encode_text(tokenizer, text, ids), ids, params)
    answers = [tokenizer.decode(span) for span in spans]
    pieces = BLANK.split(text)
    return Filled("".join(p + a for p, a in zip(pieces, [*answers, ""], strict=True)), answers)

