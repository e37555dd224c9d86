"""What to generate and how: `SamplingParams`, plain data (no torch), shared by generation, the engine and the server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the constraint layer imports torch; this module must not
    from glmkit.generation.constraints import Grammar


@dataclass
class SamplingParams:
    """What to generate and how; the defaults are greedy decoding, as in HF `generate`."""

    max_new_tokens: int | None = None  # None: up to max_length, or the context
    max_length: int | None = None  # prompt + answer, as in HF and the official chat()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # The official chat() replaces NaN/Inf scores by a huge score for this token, so sampling never crashes.
    invalid_score_token_id: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings, applied by text-level callers
    # Beam search (glmkit/generation/beam.py); the last two also constrain greedy decoding and sampling, as in HF.
    num_beams: int = 1
    length_penalty: float = 1.0  # GNMT: a beam's score is its log-probability / ((5 + length) / 6) ** this
    # True: stop once num_beams beams have ended; False: also stop when the best running beam, ended at
    # the next step, would not beat them (HF's and GLM-130B's rule); "never": only when no running beam can.
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0  # 0 = off; n: the answer never contains the same n tokens twice
    min_new_tokens: int = 0  # end tokens are banned before this many new tokens
    # Constrained decoding (glmkit.generation.constraints): only tokens that keep the answer inside this grammar are
    # sampled, and the answer ends once it is complete. Each answer walks it with a Matcher of its own.
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("max_new_tokens", "max_length", "num_beams"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("no_repeat_ngram_size", "min_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(
                f"num_beams={self.num_beams} with do_sample=True: beam search here is deterministic; "
                "pass do_sample=False to search with beams, or num_beams=1 to sample"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.grammar is not None and self.num_beams > 1:
            raise ValueError("a grammar constrains greedy decoding and sampling, not beam search: pass num_beams=1")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")

    def new_token_budget(self, prompt_length: int, context: int) -> int:
        """How many tokens may follow a prompt; errors when there is no room at all."""
        if prompt_length >= context:
            raise ValueError(
                f"the prompt has {prompt_length} tokens but the model's context (max_sequence_length) is "
                f"{context}; shorten the prompt or the history"
            )
        budget = context - prompt_length
        if self.max_length is not None:
            if prompt_length >= self.max_length:
                raise ValueError(
                    f"the prompt has {prompt_length} tokens, which leaves no room under max_length={self.max_length}; "
                    "raise max_length or shorten the prompt"
                )
            budget = min(budget, self.max_length - prompt_length)
        if self.max_new_tokens is not None:
            budget = min(budget, self.max_new_tokens)
        return budget
