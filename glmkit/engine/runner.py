"""Runs the model for the engine: prefill one request into its cache slot, decode all running slots.

Each request keeps its own sampling state (seen tokens for the repetition penalty, its seeded
generator), so a request samples exactly as it would alone, whatever else shares the batch.

Under a causal layout a prefill first copies the longest prefix of its prompt that the prefix cache holds
(glmkit.engine.prefix_cache) into the slot and encodes only the rest, then copies the prompt's full blocks that the
cache lacks out of the slot into it; when the request leaves its slot, the blocks of its reply too (`keep`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from glmkit.engine.prefix_cache import BLOCK_SIZE, PrefixCache, block_keys
from glmkit.engine.request import TokenLogprob
from glmkit.generation.embed import embed_batch
from glmkit.generation.generate import keeps_prefix, make_generator, prefill_inputs, process_logits, sample
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

if TYPE_CHECKING:
    from glmkit.generation.constraints import Matcher

log = logging.getLogger("glmkit.engine")


class ModelRunner:
    def __init__(self, model: GLM, max_batch: int, max_length: int, prefix_cache_mb: float = 0) -> None:
        self.model = model
        self.prefix_cache = prefix_cache_for(model, prefix_cache_mb)
        self.cached_tokens: int | None = None  # the latest prefill's prompt tokens from the prefix cache (None: no lookup)
        self.max_length = max_length
        model.setup_kv_cache(max_batch, max_length)
        device = model.device
        planes = model.position_layout.planes
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)  # tokens in each slot's cache
        self.last_positions = torch.zeros(max_batch, planes, 1, dtype=torch.long, device=device)
        self.steps = torch.zeros(max_batch, planes, 1, dtype=torch.long, device=device)  # position_step per slot
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=device)
        self.generators: list[torch.Generator | None] = [None] * max_batch
        self.logprob_counts: list[int | None] = [None] * max_batch  # per slot: None, or top-k alternatives asked
        self.logprobs: list[TokenLogprob | None] = [None] * max_batch  # per slot: its latest token's, if asked
        self.prompt_logprobs: list[TokenLogprob | None] = []  # the latest prefill's, if asked
        self.constraints: list[Matcher | None] = [None] * max_batch  # per slot: its request's grammar walk, if any

    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None,
                prompt_logprobs: bool = False, constraint: Matcher | None = None) -> int:
        """Encode a prompt into `slot` and return its first new token. With `logprobs` (a count of alternatives),
        each token the slot samples leaves its TokenLogprob in `self.logprobs[slot]`; with prompt_logprobs the
        prompt's own (under the model's raw logits: nothing samples them) go to `self.prompt_logprobs`; such a prompt
        is encoded whole (every position's logits), not continued from the prefix cache. With a `constraint` every
        token the slot samples is one its grammar allows (and advances it)."""
        model = self.model
        keys = block_keys(prompt_ids, self.prefix_cache.block_size) if self.prefix_cache is not None else []
        self.cached_tokens = None
        reused = 0 if prompt_logprobs else self._restore_prefix(slot, prompt_ids, keys)
        ids, positions, blocked = prefill_inputs(model, prompt_ids, reused)
        with model.kv_cache_rows(slot):
            out = model(ids, positions, blocked, cache_position=reused, last_only=not prompt_logprobs)
        self._keep_prefix(slot, keys)
        self.lengths[slot] = len(prompt_ids)
        self.last_positions[slot] = positions[0, :, -1:]
        self.steps[slot] = torch.tensor(model.position_layout.step(prompt_ids, model.special_ids))[:, None]
        self.seen[slot] = False
        self.seen[slot, torch.tensor(prompt_ids, device=model.device)] = True
        self.generators[slot] = make_generator(params.seed, model.device)
        self.logprob_counts[slot] = logprobs
        self.constraints[slot] = constraint
        if prompt_logprobs:
            table = out.logits[0, :-1].float().log_softmax(-1)
            self.prompt_logprobs = [None, *(token_logprob(table[i], token, logprobs or 0)
                                            for i, token in enumerate(prompt_ids[1:]))]
        return self._sample(slot, out.logits[0, -1].float(), params)

    @torch.inference_mode()
    def keep(self, slot: int, ids: list[int]) -> None:
        """A request leaves `slot`, whose cache holds the keys and values of ids[:length] (its prompt and the tokens
        fed back): the prefix cache takes the full blocks it lacks, so the conversation's next turn, whose prompt
        repeats this one's and its reply, finds more than the prompt's blocks."""
        if self.prefix_cache is not None:
            held = ids[:int(self.lengths[slot])]
            self._keep_prefix(slot, block_keys(held, self.prefix_cache.block_size))

    def _restore_prefix(self, slot: int, prompt_ids: list[int], keys: list[bytes]) -> int:
        """Copy the longest prefix of the prompt the prefix cache holds into `slot`'s cache, at most all but the
        prompt's last token (fed again for its logits); returns its length. Copying a prefix's keys and values costs
        a fraction of computing them; the paged KV cache (#20) will map the cached blocks into the slot instead."""
        if self.prefix_cache is None:
            return 0
        blocks = self.prefix_cache.lookup(keys)
        reused = min(len(blocks) * self.prefix_cache.block_size, len(prompt_ids) - 1)
        if reused > 0:
            self.model.write_kv_cache(slot, 0, torch.cat(blocks, dim=3)[:, :, :, :reused])
        self.prefix_cache.count(len(prompt_ids), reused)
        self.cached_tokens = reused
        return reused

    def _keep_prefix(self, slot: int, keys: list[bytes]) -> None:
        """Copy the prompt's full blocks the prefix cache lacks out of `slot`'s cache into it (#20: share them)."""
        if self.prefix_cache is not None:
            size = self.prefix_cache.block_size
            self.prefix_cache.insert(keys, lambda i: self.model.read_kv_cache(slot, i * size, (i + 1) * size))

    @torch.inference_mode()
    def decode(self, tokens: list[int], params: list[SamplingParams]) -> list[int | None]:
        """Feed each of slots 0..n-1 its latest token; return each slot's next token, or None for a slot whose
        sampling failed (that request ends with an error; the others are not affected)."""
        n = len(tokens)
        model = self.model
        positions = self.last_positions[:n] + self.steps[:n]
        lengths = self.lengths[:n]
        span = int(lengths.max()) + 1
        blocked = torch.arange(span, device=model.device)[None, :] > lengths[:, None]  # [n, span]
        ids = torch.tensor(tokens, device=model.device)[:, None]
        out = model(ids, positions, blocked[:, None, None, :], cache_position=lengths.clone(), last_only=True)
        self.lengths[:n] += 1
        self.last_positions[:n] = positions
        return [self._sample_or_none(row, out.logits[row, -1].float(), params[row]) for row in range(n)]

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
        """One batch of checked inputs' embeddings (glmkit.generation.embed). The pass uses no cache position, so
        the slots' caches are left as they are."""
        return embed_batch(self.model, sequences).tolist()

    def move(self, src: int, dst: int) -> None:
        """Move a request's whole state from slot src to slot dst (the scheduler compacts the batch)."""
        self.model.move_kv_cache_row(src, dst)
        for tensor in (self.lengths, self.last_positions, self.steps, self.seen):
            tensor[dst] = tensor[src]
        for per_slot in (self.generators, self.logprob_counts, self.logprobs, self.constraints):
            per_slot[dst] = per_slot[src]


def prefix_cache_for(model: GLM, megabytes: float) -> PrefixCache | None:
    """A prefix cache of `megabytes`, or None: when 0, or for a prefix-LM (ChatGLM-6B, GLM-130B), which reads its
    prompt bidirectionally, so a prefix's keys and values change with whatever follows it. The capacity counts the
    whole model's keys and values (every KV head, as without tensor parallelism): every rank computes the same
    number of blocks from the config, so ranks that replay the same calls evict the same blocks."""
    if megabytes <= 0:
        return None
    if not keeps_prefix(model.position_layout):
        log.info("prefix cache off: this %s model reads its prompt bidirectionally, so no prefix can be reused",
                 model.position_layout.name)
        return None
    c = model.config
    block_bytes = BLOCK_SIZE * c.num_layers * 2 * c.kv_heads * c.head_dim * model.dtype.itemsize
    capacity = int(megabytes * 2**20) // block_bytes
    if capacity < 1:
        log.warning("prefix cache off: %s MB holds no block of %d tokens (%d bytes)", megabytes, BLOCK_SIZE,
                    block_bytes)
        return None
    return PrefixCache(capacity)


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s entry of a [V] log-softmax, with the k most likely tokens (those at -inf, which cannot be picked,
    left out)."""
    top: list[tuple[int, float]] = []
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        top = [(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True) if v != float("-inf")]
    return TokenLogprob(token, float(logprobs[token]), top)
