"""Runs the model for the engine: one forward pass a step over the paged KV cache, for every decoding request's
latest token and the prompt chunks together (glmkit.models.paged: the linears read their weights once for all).

Each request keeps its own sampling state in its slot (seen tokens for the repetition penalty, its seeded
generator, its grammar walk), so a request samples exactly as it would alone, whatever else shares the batch. The
scheduler decides which blocks each request holds; the runner is told them with every call, so under tensor
parallelism every rank, replaying the same calls, writes the same blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from glmkit.engine.blocks import NULL_BLOCK, blocks_for
from glmkit.engine.prefix_cache import BLOCK_SIZE
from glmkit.engine.request import TokenLogprob
from glmkit.generation.embed import embed_batch
from glmkit.generation.generate import keeps_prefix, make_generator, prefill_inputs, process_logits, sample
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM
from glmkit.models.paged import PagedStep, Segment, kv_bytes_per_token

if TYPE_CHECKING:
    from glmkit.generation.constraints import Matcher

log = logging.getLogger("glmkit.engine")


@dataclass
class DecodeRow:
    """Feed `token` at sequence position `position` (its keys and values go to blocks[position // block_size])."""

    slot: int
    token: int
    position: int
    blocks: list[int]
    params: SamplingParams


@dataclass
class PromptChunk:
    """Encode ids[start:stop] of a prompt in `slot`; with `sample` (the prompt's last chunk, and a request that has
    no reply yet) the last position's logits sample its first token."""

    slot: int
    ids: list[int]
    start: int
    stop: int
    blocks: list[int]
    params: SamplingParams
    sample: bool
    prompt_logprobs: bool = False


@dataclass
class SlotState:
    """What a preempted request's slot held, kept until it is admitted again."""

    generator: torch.Generator | None
    logprob_count: int | None
    constraint: Matcher | None
    step: torch.Tensor = field(repr=False)


class ModelRunner:
    def __init__(self, model: GLM, max_batch: int, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.block_size = block_size
        model.setup_paged_kv_cache(num_blocks, block_size, kv_dtype)
        model.zero_kv_blocks([NULL_BLOCK])  # it pads shorter block tables: masked out, but must not be NaN
        device = model.device
        planes = model.position_layout.planes
        self.last_positions = torch.zeros(max_batch, planes, 1, dtype=torch.long, device=device)
        self.steps = torch.zeros(max_batch, planes, 1, dtype=torch.long, device=device)  # position_step per slot
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=device)
        self.generators: list[torch.Generator | None] = [None] * max_batch
        self.logprob_counts: list[int | None] = [None] * max_batch  # per slot: None, or top-k alternatives asked
        self.logprobs: list[TokenLogprob | None] = [None] * max_batch  # per slot: its latest token's, if asked
        self.prompt_logprobs: list[list[TokenLogprob | None]] = [[] for _ in range(max_batch)]  # per slot, if asked
        self.constraints: list[Matcher | None] = [None] * max_batch  # per slot: its request's grammar walk, if any
        self.suspended: dict[str, SlotState] = {}  # preempted requests' sampling state, by request id

    def admit(self, slot: int, request_id: str, prompt_ids: list[int], output_ids: list[int],
              params: SamplingParams, logprobs: int | None = None, constraint: Matcher | None = None) -> None:
        """Set up `slot` for a request: a new one (no output_ids), or one preempted after output_ids, whose sampling
        state comes back as it was."""
        model = self.model
        kept = self.suspended.pop(request_id, None)
        self.seen[slot] = False
        self.seen[slot, torch.tensor([*prompt_ids, *output_ids], device=model.device)] = True
        if kept is None:
            step = torch.tensor(model.position_layout.step(prompt_ids, model.special_ids))[:, None]
            kept = SlotState(make_generator(params.seed, model.device), logprobs, constraint, step)
        self.steps[slot] = kept.step
        self.generators[slot], self.logprob_counts[slot], self.constraints[slot] = (kept.generator,
                                                                                    kept.logprob_count, kept.constraint)
        self.prompt_logprobs[slot] = [None]

    def suspend(self, slot: int, request_id: str) -> None:
        """The request in `slot` is preempted: keep its sampling state for its re-admission."""
        self.suspended[request_id] = SlotState(self.generators[slot], self.logprob_counts[slot],
                                               self.constraints[slot], self.steps[slot].clone())

    def forget(self, request_id: str) -> None:
        """A preempted request ended while waiting (aborted): drop its kept state."""
        self.suspended.pop(request_id, None)

    def zero_blocks(self, blocks: list[int]) -> None:
        if blocks:
            self.model.zero_kv_blocks(blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's keys and values, every layer's."""
        if pairs:
            self.model.copy_kv_blocks(pairs)

    @torch.inference_mode()
    def step(self, rows: list[DecodeRow], chunks: list[PromptChunk]) -> tuple[list[int | None], list[int | None]]:
        """One forward pass: each decode row's next token and each chunk's sampled token (None for a row whose
        sampling failed, whose request then ends with an error while the others go on; None too for a chunk that
        samples nothing)."""
        model = self.model
        parts = [self._decode_part(rows)] if rows else []
        offset = len(rows)
        for chunk in chunks:
            parts.append(self._chunk_part(chunk, offset))
            offset += chunk.stop - chunk.start
        ids, positions, writes, segments = (list(x) for x in zip(*parts, strict=True))
        hidden = model.paged_hidden_states(torch.cat(ids), torch.cat(positions, dim=1),
                                           PagedStep(torch.cat(writes), segments))
        tokens = []
        if rows:
            logits = model.lm_head(hidden[:len(rows)]).float()
            tokens = [self._sample_or_none(row.slot, logits[i], row.params) for i, row in enumerate(rows)]
        firsts: list[int | None] = []
        for chunk, segment in zip(chunks, segments[len(segments) - len(chunks):], strict=True):
            chunk_hidden = hidden[segment.start:segment.stop]
            if chunk.prompt_logprobs:
                self._prompt_logprobs(chunk, model.lm_head(chunk_hidden).float())
            first = None
            if chunk.sample:
                first = self._sample_or_none(chunk.slot, model.lm_head(chunk_hidden[-1:]).float()[0], chunk.params)
            firsts.append(first)
        return tokens, firsts

    def _decode_part(self, rows: list[DecodeRow]):
        device = self.model.device
        slots = torch.tensor([row.slot for row in rows], device=device)
        positions = self.last_positions[slots] + self.steps[slots]  # [n, P, 1]
        self.last_positions[slots] = positions
        width = max(len(row.blocks) for row in rows)
        table = torch.tensor([[*row.blocks, *[NULL_BLOCK] * (width - len(row.blocks))] for row in rows], device=device)
        gather = self._slots(table)
        at = torch.tensor([row.position for row in rows], device=device)
        allowed = torch.arange(gather.shape[1], device=device)[None, :] <= at[:, None]
        write = gather.gather(1, at[:, None])[:, 0]
        ids = torch.tensor([row.token for row in rows], device=device)
        return ids, positions[:, :, 0].T, write, Segment(0, len(rows), 1, gather, allowed[:, None, None, :])

    def _chunk_part(self, chunk: PromptChunk, start: int):
        model = self.model
        ids, positions, blocked = prefill_inputs(model, chunk.ids[:chunk.stop], chunk.start)  # mask [1, 1, S, stop]
        self.last_positions[chunk.slot] = positions[0, :, -1:]
        gather = self._slots(torch.tensor([chunk.blocks], device=model.device))
        allowed = torch.zeros(1, 1, ids.shape[1], gather.shape[1], dtype=torch.bool, device=model.device)
        allowed[..., :chunk.stop] = ~blocked
        write = gather[0, chunk.start:chunk.stop]
        return ids[0], positions[0], write, Segment(start, 1, ids.shape[1], gather, allowed)

    def _slots(self, table: torch.Tensor) -> torch.Tensor:
        """Block tables [rows, width] -> the pool slot of each of their positions [rows, width * block_size]."""
        offsets = torch.arange(self.block_size, device=table.device)
        return (table[:, :, None] * self.block_size + offsets).flatten(1)

    def _prompt_logprobs(self, chunk: PromptChunk, logits: torch.Tensor) -> None:
        """Each prompt token's logprob under the position before it (the raw logits: nothing samples them)."""
        table = logits.log_softmax(-1)
        k = self.logprob_counts[chunk.slot] or 0
        for i, position in enumerate(range(chunk.start, chunk.stop)):
            if position + 1 < len(chunk.ids):
                self.prompt_logprobs[chunk.slot].append(token_logprob(table[i], chunk.ids[position + 1], k))

    def _sample_or_none(self, slot: int, logits: torch.Tensor, params: SamplingParams) -> int | None:
        try:
            return self._sample(slot, logits, params)
        except Exception:  # noqa: BLE001 (one request's sampling must not fail the batch)
            log.exception("sampling failed for the request in slot %d", slot)
            return None

    def _sample(self, slot: int, logits: torch.Tensor, params: SamplingParams) -> int:
        constraint = self.constraints[slot]
        bias = None if constraint is None else constraint.bias(logits.shape[-1])
        scores = process_logits(logits[None], self.seen[slot:slot + 1], params, bias)
        token = int(sample(scores, params, self.generators[slot])[0])
        self.seen[slot, token] = True
        if constraint is not None:
            constraint.advance(token)
        k = self.logprob_counts[slot]
        # The log-softmax of the very scores `sample` used: under greedy the logits (after any repetition penalty),
        # under sampling those divided by the temperature with top-k / top-p's cut tokens at -inf; a grammar's
        # forbidden tokens at -inf in both.
        self.logprobs[slot] = None if k is None else token_logprob(scores[0].log_softmax(-1), token, k)
        return token

    def embed(self, sequences: list[list[int]]) -> list[list[float]]:
        """One batch of checked inputs' embeddings (glmkit.generation.embed). The pass uses no cache, so the
        requests' blocks are left as they are."""
        return embed_batch(self.model, sequences).tolist()

    def move(self, src: int, dst: int) -> None:
        """Move a request's sampling state from slot src to slot dst (the scheduler compacts the batch); its keys
        and values stay in their blocks."""
        for tensor in (self.last_positions, self.steps, self.seen):
            tensor[dst] = tensor[src]
        for per_slot in (self.generators, self.logprob_counts, self.logprobs, self.prompt_logprobs, self.constraints):
            per_slot[dst] = per_slot[src]


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry of a [V] log-softmax, with the k most likely tokens (those at -inf, which cannot be picked,
    left out)."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        top = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True) if v != float("-inf")]
    return TokenLogprob(token, float(logprobs[token]), top)


def pool_size(model: GLM, max_batch: int, max_length: int, prefix_cache_mb: float, kv_cache_mb: float | None,
              kv_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(blocks in the pool, of which the prefix cache may hold) for these settings. The padding block comes on
    top; the prefix cache gets none for a prefix-LM (ChatGLM-6B, GLM-130B), which reads its prompt
    bidirectionally, so a prefix's keys and values change with whatever follows it. Sizes count the whole model's
    keys and values (every KV head, as without tensor parallelism), so every rank computes the same pool."""
    c = model.config
    block_bytes = BLOCK_SIZE * c.num_layers * kv_bytes_per_token(c.kv_heads, c.head_dim, kv_dtype or model.dtype)
    if kv_cache_mb is None:
        working = max_batch * blocks_for(max_length, BLOCK_SIZE)
    else:
        working = int(kv_cache_mb * 2**20) // block_bytes
        if working < 1:
            raise ValueError(f"--kv-cache-mb {kv_cache_mb} holds no block of {BLOCK_SIZE} tokens ({block_bytes} "
                             "bytes): give it more")
    prefix = 0
    if prefix_cache_mb > 0 and keeps_prefix(model.position_layout):
        prefix = int(prefix_cache_mb * 2**20) // block_bytes
        if prefix < 1:
            log.warning("prefix cache off: %s MB holds no block of %d tokens (%d bytes)", prefix_cache_mb,
                        BLOCK_SIZE, block_bytes)
    elif prefix_cache_mb > 0:
        log.info("prefix cache off: this %s model reads its prompt bidirectionally, so no prefix can be reused",
                 model.position_layout.name)
    return 1 + working + prefix, prefix
