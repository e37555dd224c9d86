"""Beam search over the KV cache: GNMT length penalty, early stopping, n-gram and minimum-length bans.

Semantics (Hugging Face's `num_beams`, with GLM-130B's GNMT penalty):

  * a beam's raw score is the sum of its tokens' log-probabilities (log-softmax of the logits after
    the repetition penalty, if any); banned tokens are removed, the others are not renormalised;
  * a finished beam (it produced an end token, counted in its length) or a beam cut by the length
    budget is ranked by `raw / ((5 + length) / 6) ** length_penalty`, length = new tokens;
  * each step keeps the best `num_beams` continuations of all beams; end tokens among the
    `(1 + n_end) * num_beams` best candidates become finished beams;
  * once `num_beams` beams have finished, `early_stopping=True` stops; False (the default, HF's and
    GLM-130B's rule) stops when the best running beam, were it to end at the next step, would not beat
    the worst finished one; "never" stops only when no running beam can beat it at any length it may
    still reach (exact, but with a positive length penalty it usually runs to the length limit);
  * ties go to the lower (beam, token) index, so the result never depends on the kernel's topk order.

The search itself (`search`) only asks for a `step(tokens, parents)` callable that feeds one token per
beam after reordering the cache rows, so plain generation and blank infilling share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from glmkit.generation.generate import (
    DecodeState,
    ban_tokens,
    decode_one_token,
    end_tokens,
    prefill,
    process_logits,
    strip_left_padding,
)
from glmkit.generation.sampling import SamplingParams
from glmkit.models.glm import GLM

# tokens [n], parents [n] (the beam row each token extends) -> next logits [n, V]
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Beam:
    tokens: list[int]  # the new tokens, the end token included when finished
    score: float  # log-probability / GNMT length penalty
    finished: bool


def gnmt_penalty(length: int, alpha: float) -> float:
    return ((5.0 + length) / 6.0) ** alpha


class Hypotheses:
    """The best `size` ended beams so far, best first; on equal scores the earlier one stays ahead."""

    def __init__(self, size: int, alpha: float) -> None:
        self.size, self.alpha = size, alpha
        self.beams: list[Beam] = []

    @property
    def full(self) -> bool:
        return len(self.beams) >= self.size

    def add(self, tokens: list[int], logprob: float, finished: bool) -> None:
        if logprob == float("-inf"):
            return
        score = logprob / gnmt_penalty(len(tokens), self.alpha)
        if self.full and score <= self.beams[-1].score:
            return
        at = next((i for i, b in enumerate(self.beams) if score > b.score), len(self.beams))
        self.beams.insert(at, Beam(tokens, score, finished))
        del self.beams[self.size:]

    def done(self, best_running: float, length: int, budget: int, early_stopping: bool | str) -> bool:
        """Whether to stop, the best running beam having raw score `best_running` at `length` tokens."""
        if not self.full:
            return False
        if early_stopping is True:
            return True
        lengths = [min(length + 1, budget)]
        if early_stopping == "never":
            # Log-probabilities only fall, so the best a running beam can reach is its score now under the
            # most favourable penalty among the lengths it may still end at (the penalty is monotone).
            lengths.append(budget)
        return self.beams[-1].score >= max(best_running / gnmt_penalty(n, self.alpha) for n in lengths)


def top_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k best finite scores [N], best first, ties by lower index (deterministic)."""
    finite = torch.isfinite(scores)
    k = min(k, int(finite.sum()))
    if k == 0:
        return scores.new_zeros(0, dtype=torch.long)
    kth = torch.topk(scores.masked_fill(~finite, float("-inf")), k).values[-1]
    index = torch.nonzero(finite & (scores >= kth)).flatten()  # ascending
    order = torch.sort(scores[index], descending=True, stable=True).indices
    return index[order][:k]


def search(first_logits: torch.Tensor, step: StepFn, seen: torch.Tensor, params: SamplingParams, budget: int,
           eos: Sequence[int]) -> list[Beam]:
    """Beam search from one row's logits [1, V]; `seen` [1, V] marks the prompt's tokens (repetition penalty).

    Returns up to num_beams beams, best first."""
    width, vocab = params.num_beams, first_logits.shape[-1]
    hypotheses = Hypotheses(width, params.length_penalty)
    sequences: list[list[int]] = [[]]
    sums = torch.zeros(1, device=first_logits.device)
    logits = first_logits
    for t in range(budget):
        logprobs = torch.log_softmax(process_logits(logits, seen, params), dim=-1)
        total = (sums[:, None] + ban_tokens(logprobs, sequences, params, eos)).flatten()  # [n * V]
        parents, tokens, kept = [], [], []
        for index in top_candidates(total, (1 + len(eos)) * width).tolist():
            parent, token = divmod(index, vocab)
            if token in eos:
                hypotheses.add(sequences[parent] + [token], float(total[index]), finished=True)
                continue
            parents.append(parent)
            tokens.append(token)
            kept.append(index)
            if len(kept) == width:
                break
        sequences = [sequences[p] + [tok] for p, tok in zip(parents, tokens, strict=True)]
        sums = total[kept]
        if not kept or hypotheses.done(float(sums[0]), t + 1, budget, params.early_stopping):
            return hypotheses.beams
        if t == budget - 1:
            break
        parent_rows = torch.tensor(parents, device=logits.device)
        token_ids = torch.tensor(tokens, device=logits.device)
        seen = seen[parent_rows].scatter(1, token_ids[:, None], True)
        logits = step(token_ids, parent_rows)
    for tokens_so_far, raw in zip(sequences, sums.tolist(), strict=True):  # cut by the budget
        hypotheses.add(tokens_so_far, raw, finished=False)
    return hypotheses.beams


def beam_search(model: GLM, prompt_ids: Sequence[int], params: SamplingParams) -> list[Beam]:
    """Up to `num_beams` answers to one prompt, best first, each with its length-penalised score."""
    if not prompt_ids:
        raise ValueError("beam search needs a non-empty prompt")
    budget = params.new_token_budget(len(prompt_ids), model.config.max_sequence_length)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=model.device)
    seen[0, list(prompt_ids)] = True
    try:
        with torch.inference_mode():
            logits, state = prefill(model, [prompt_ids], len(prompt_ids) + budget, cache_rows=params.num_beams)
            return search(logits, _decode_step(model, state), seen, params, budget, end_tokens(model, params))
    finally:
        model.clear_kv_cache()


def _decode_step(model: GLM, state: DecodeState) -> StepFn:
    """One cached decoding step for all beams; they share the prompt, so one row's positions serve all."""

    def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        model.select_kv_cache_rows(parents, state.length)
        rows = len(tokens)
        beams = DecodeState(state.length, state.last_positions[:1].expand(rows, -1, -1),
                            state.pad_slots[:1].expand(rows, -1), state.step[:1].expand(rows, -1, -1))
        logits = decode_one_token(model, tokens, beams)
        state.length, state.last_positions = beams.length, beams.last_positions[:1]
        return logits

    return step


def beam_generate(model: GLM, input_ids: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF generate with num_beams: [B, L] -> [B, L + new], each row's best beam, pad-filled on the right."""
    answers = [beam_search(model, seq, params)[0].tokens for seq in strip_left_padding(input_ids,
                                                                                         model.config.pad_token_id)]
    width = max(len(a) for a in answers)
    new = torch.full((len(answers), width), model.config.pad_token_id, dtype=torch.long)
    for row, answer in enumerate(answers):
        new[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
    return torch.cat([input_ids.to(model.device), new.to(model.device)], dim=1)
