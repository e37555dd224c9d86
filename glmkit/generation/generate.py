"""Token generation: logits processing, sampling, prefill and cached decoding.

One code path, `stream_tokens`, serves `model.generate`, chat, the CLI and (later) the server: it is
a generator that yields each step's new tokens, so streaming is the default and collecting a whole
answer is just draining it. Prompts of different lengths are left-padded with the *tokenizer's*
layout (pads hidden, positions restarting at each prompt's first real token), so a prompt decodes
the same alone or in a batch.

KV-cache reuse (`stream_tokens(..., reuse_cache=True)`, what chat's follow-up turns use): a one-row generation
under a causal layout keeps its cache on the model when it ends (`GLM.retain_kv_cache`, with the ids it holds:
the prompt and every generated token fed back); the next one-row generation with reuse prefills only what
follows the longest common prefix of its prompt and those ids (`prefill_reusing`). Positions under a causal
layout are 0..L-1 whatever comes later, so a prefix's keys and values are the same in the longer sequence:
the result equals a full prefill's up to float rounding of a differently shaped sum.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from glmkit.generation.sampling import SamplingParams  # still importable from here too
from glmkit.models.config import GLMConfig
from glmkit.models.glm import GLM
from glmkit.models.positions import PositionLayout, padded_layout


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF/CTRL rule: scores of tokens already present shrink (positive) or grow more negative."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least the best one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # mass before this token already >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (fp32) -> processed scores, in HF's order: penalty, invalid-score guard, warpers.

    `bias` [B, V] or [V] (a grammar's: 0 for allowed tokens, -inf for the others) comes after the guard, which would
    take its -inf for broken scores, and before the warpers, so temperature, top-k and top-p see only the allowed
    tokens (and logprobs of these scores exclude the rest)."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.invalid_score_token_id is not None and not torch.isfinite(logits).all():
        logits = torch.zeros_like(logits)
        logits[..., params.invalid_score_token_id] = 5e4
    if bias is not None:
        logits = logits + bias.to(logits.device)
    if not params.do_sample:
        return logits
    logits = logits / params.temperature
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def banned_by_ngrams(tokens: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `tokens` (HF's no_repeat_ngram rule)."""
    if n <= 0 or len(tokens) < n - 1:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


def ban_tokens(scores: torch.Tensor, history: Sequence[Sequence[int]], params: SamplingParams,
               eos: Sequence[int]) -> torch.Tensor:
    """scores [B, V] with the tokens that min_new_tokens and no_repeat_ngram_size forbid set to -inf.

    `history` holds each row's new tokens so far (all rows equally long): n-grams are counted over
    the answer only, so an answer may still quote its prompt."""
    if params.min_new_tokens and len(history[0]) < params.min_new_tokens:
        scores = scores.clone()
        scores[:, list(eos)] = float("-inf")
    if params.no_repeat_ngram_size:
        scores = scores.clone()
        for row, tokens in enumerate(history):
            scores[row, banned_by_ngrams(tokens, params.no_repeat_ngram_size)] = float("-inf")
    return scores


def sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """scores [B, V] -> next tokens [B]."""
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class DecodeState:
    """What a batch needs between steps: where the cache ends, positions, and which cache slots are pads."""

    length: int  # tokens written to the cache so far
    last_positions: torch.Tensor  # [B, P, 1], the positions of the latest token
    pad_slots: torch.Tensor  # [B, prompt_length], True where the prompt was padded
    step: torch.Tensor  # [B, P, 1], how the positions move per token (positions.position_step)

    def next_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, P, 1] and mask [B, 1, 1, length + 1] for the next token.

        Under 2D positions a new token keeps the mask's position and counts one more block position;
        under 1D positions the position itself counts up after [gMASK] and stays after [MASK]."""
        positions = self.last_positions + self.step
        mask = torch.zeros(self.pad_slots.shape[0], 1, 1, self.length + 1, dtype=torch.bool, device=positions.device)
        mask[:, 0, 0, : self.pad_slots.shape[1]] = self.pad_slots
        return positions, mask


@torch.inference_mode()
def prefill(model: GLM, sequences: Sequence[Sequence[int]], total_slots: int,
            cache_rows: int | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Encode the left-padded prompts into a fresh KV cache; return the last position's logits [B, V].

    `cache_rows` (default: one per prompt) leaves room for beams, which fork from the prompt's row."""
    layout = model.position_layout
    batch = {k: v.to(model.device) for k, v in padded_layout(sequences, model.special_ids, layout=layout).items()}
    model.setup_kv_cache(cache_rows or len(sequences), total_slots)
    out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], cache_position=0, last_only=True)
    model.last_prefill = PrefillStats(cached=0, computed=batch["input_ids"].numel())
    pad_slots = batch["input_ids"].new_zeros(batch["input_ids"].shape, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        pad_slots[row, : batch["input_ids"].shape[1] - len(seq)] = True
    step = torch.tensor([layout.step(s, model.special_ids) for s in sequences], device=model.device)
    state = DecodeState(batch["input_ids"].shape[1], batch["position_ids"][:, :, -1:], pad_slots, step[..., None])
    return out.logits[:, -1].float(), state


@dataclass(frozen=True)
class PrefillStats:
    """The last prefill's split of the prompt (model.last_prefill): what the cache already held, what was run."""

    cached: int  # leading prompt tokens whose keys and values came from the retained cache
    computed: int  # prompt tokens (all rows, pads included) run through the model


def keeps_prefix(layout: PositionLayout) -> bool:
    """True where a prefix's keys and values stay valid when the sequence grows: positions 0..L-1, causal
    attention. Not ChatGLM-6B's 2D or GLM-130B's 1D prefix-LM: their context is read bidirectionally up to
    <sop> (and ChatGLM-6B's prompt ends with [gMASK] <sop>, its rounds re-rendered), so every turn prefills anew."""
    return layout.name == "causal"


def prefill_inputs(model: GLM, ids: Sequence[int], reused: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What encodes one unpadded prompt's ids[reused:] into a one-row cache whose first `reused` slots hold ids[:reused]
    already: the ids [1, n], positions [1, P, n] and mask [1, 1, n, len(ids)] (n = len(ids) - reused). reused 0: the
    whole prompt, under any layout. A reused prefix needs a layout that keeps_prefix: its tokens take positions
    reused..L-1 and see every cached slot and the new tokens up to themselves, as the same rows of the whole
    prompt's causal mask would (chat's follow-up turns and the engine's prefix cache both encode this way)."""
    if reused == 0:
        positions, blocked = model.position_layout.sequence(ids, model.special_ids, prefer_gmask=False)
    else:
        if not keeps_prefix(model.position_layout):
            raise ValueError(f"a {model.position_layout.name} model cannot continue from a cached prefix")
        count = len(ids) - reused
        positions = torch.arange(reused, len(ids)).view(1, count)
        blocked = torch.ones(count, count, dtype=torch.bool).triu(1)
        blocked = torch.cat([blocked.new_zeros(count, reused), blocked], dim=1)
    device = model.device
    rest = torch.tensor([list(ids[reused:])], dtype=torch.long, device=device)
    return rest, positions[None].to(device), blocked[None, None].to(device)


@torch.inference_mode()
def prefill_reusing(model: GLM, ids: Sequence[int], total_slots: int) -> tuple[torch.Tensor, DecodeState]:
    """One unpadded prompt under a causal layout: reuse the retained cache's common prefix with `ids` and encode
    only the rest, at positions reused..L-1 seeing the cached slots; the last position's logits [1, V]."""
    reused = model.resume_kv_cache(ids, total_slots)
    device = model.device
    rest, positions, mask = prefill_inputs(model, ids, reused)
    out = model(rest, positions, mask, cache_position=reused, last_only=True)
    model.last_prefill = PrefillStats(cached=reused, computed=rest.shape[1])
    pad_slots = torch.zeros(1, len(ids), dtype=torch.bool, device=device)
    step = torch.ones(1, 1, 1, dtype=torch.long, device=device)
    return out.logits[:, -1].float(), DecodeState(len(ids), positions[:, :, -1:], pad_slots, step)


@torch.inference_mode()
def decode_one_token(model: GLM, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row [B] at the end of the cache; return the next logits [B, V]."""
    positions, mask = state.next_inputs()
    out = model(tokens[:, None], positions, mask, cache_position=state.length, last_only=True)
    state.length += 1
    state.last_positions = positions
    return out.logits[:, -1].float()


def stream_tokens(model: GLM, sequences: Sequence[Sequence[int]], params: SamplingParams,
                  reuse_cache: bool = False) -> Iterator[torch.Tensor]:
    """Yield each step's new token per row ([B] LongTensor); rows that have finished yield the pad id.

    Stops when every row has produced an end token or the budget (max_new_tokens / max_length /
    context) runs out. The KV cache is released when the generator is closed; with `reuse_cache` (one
    prompt, causal layout) it is retained instead, ended early or not, for the next call with reuse
    to start from (an error mid-way releases it)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("generation needs at least one non-empty prompt")
    prompt_length = max(len(s) for s in sequences)
    budget = params.new_token_budget(prompt_length, model.config.max_sequence_length)
    total_slots = prompt_length + budget
    device = model.device
    generator = make_generator(params.seed, device)
    eos_ids = end_tokens(model, params)
    eos = torch.tensor(eos_ids, device=device)
    seen = torch.zeros(len(sequences), model.config.vocab_size, dtype=torch.bool, device=device)
    for row, seq in enumerate(sequences):
        seen[row, torch.tensor(list(seq), device=device)] = True
    finished = torch.zeros(len(sequences), dtype=torch.bool, device=device)
    matchers = [params.grammar.matcher(eos_ids) for _ in sequences] if params.grammar is not None else None
    history: list[list[int]] = [[] for _ in sequences]
    reuse = reuse_cache and len(sequences) == 1 and keeps_prefix(model.position_layout)
    fed = list(sequences[0])  # reuse: the ids whose keys and values the cache holds
    intact = True
    try:
        if reuse:
            logits, state = prefill_reusing(model, sequences[0], total_slots)
        else:
            logits, state = prefill(model, sequences, total_slots)
        for step in range(budget):
            bias = None if matchers is None else grammar_bias(matchers, finished, logits.shape[-1])
            scores = ban_tokens(process_logits(logits, seen, params, bias), history, params, eos_ids)
            tokens = sample(scores, params, generator)
            tokens = tokens.masked_fill(finished, model.config.pad_token_id)
            for row, token in zip(history, tokens.tolist(), strict=True):
                row.append(token)
            seen[torch.arange(len(sequences), device=device), tokens] |= ~finished
            yield tokens
            if matchers is not None:
                finished |= advance_grammars(matchers, tokens, finished)
            finished |= torch.isin(tokens, eos)
            if bool(finished.all()) or step == budget - 1:
                return
            logits = decode_one_token(model, tokens, state)
            fed.append(history[0][-1])
    except BaseException as error:
        intact = isinstance(error, GeneratorExit)  # closed between steps: the cache still holds `fed`
        raise
    finally:
        if reuse and intact:
            model.retain_kv_cache(fed)
        else:
            model.clear_kv_cache()


def grammar_bias(matchers: Sequence, finished: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size]: each running row's grammar bias (Matcher.bias); a finished row's is 0, its token is a pad anyway."""
    rows = [torch.zeros(size) if done else m.bias(size) for m, done in zip(matchers, finished.tolist(), strict=True)]
    return torch.stack(rows)


def advance_grammars(matchers: Sequence, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Advance each running row's matcher by its token; [B] True where the grammar is now complete (the answer
    ends there, as at an end token)."""
    done = []
    for matcher, token, was_done in zip(matchers, tokens.tolist(), finished.tolist(), strict=True):
        if not was_done:
            matcher.advance(token)
        done.append(not was_done and matcher.finished)
    return torch.tensor(done, device=tokens.device)


def end_tokens(model: GLM, params: SamplingParams) -> list[int]:
    return list(params.eos_token_ids or model.config.stop_token_ids)


def strip_left_padding(input_ids: torch.Tensor, pad_id: int) -> list[list[int]]:
    """Recover each prompt from a left-padded batch [B, L]."""
    sequences = []
    for row in input_ids.tolist():
        start = next((i for i, t in enumerate(row) if t != pad_id), len(row))
        sequences.append(row[start:])
    return sequences


def generate(model: GLM, input_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[B, L] prompts (left-padded when of different lengths) -> [B, L + new] as HF's generate returns."""
    sequences = strip_left_padding(input_ids, model.config.pad_token_id)
    steps = list(stream_tokens(model, sequences, params))
    if not steps:
        return input_ids
    return torch.cat([input_ids.to(model.device), torch.stack(steps, dim=1)], dim=1)


def greedy_completions(model: GLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_token_ids: tuple[int, ...]) -> list[list[int]]:
    """Each prompt's greedy continuation, without its end token (prompts decoded together, left-padded)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids)
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for tokens in stream_tokens(model, prompts, params):
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                done[row] = token in eos_token_ids
                if not done[row]:
                    answers[row].append(token)
    return answers


def random_prompt(config: GLMConfig, length: int, seed: int | None = None) -> list[int]:
    """`length` random ids with the family's [gMASK] sop: at the end (ChatGLM-6B), in front (the causal families;
    left out where a tiny vocabulary has no such ids), for timing on random weights. Seeded by `seed` (default: the
    length)."""
    g = torch.Generator().manual_seed(length if seed is None else seed)
    specials = [t for t in (config.gmask_token_id, config.bos_token_id) if t is not None and t < config.vocab_size]
    high = min(config.vocab_size, config.mask_token_id or config.vocab_size)
    body = torch.randint(10, high, (length - len(specials),), generator=g).tolist()
    return [*specials, *body] if config.causal else [*body, *specials]
