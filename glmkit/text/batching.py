"""Left-padded batches for the causal tokenizers (ChatGLM2/3, GLM-4), in the shape their official `_pad` returns.

The official ChatGLM2/3 and GLM-4 tokenizers pad on the left only and return `attention_mask` [B, L] (1 = real
token, 0 = pad) and `position_ids` [B, L] (0 on pads, real tokens counted 0..n-1): the model needs those
positions, otherwise every real token of a shorter row is shifted by its pad count (spec 1.7, pitfall 12).
ChatGLM-6B's 2D prefix-LM batches are built by `glmkit.models.positions.padded_layout` instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from glmkit.text.tokenizer import BatchEncoding, _padded_length, _unpadded_ids


def causal_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    padding: bool | str = False,
    max_length: int | None = None,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """input_ids, attention_mask and position_ids for already-encoded `sequences`, left-padded with `pad_id`.

    `padding`: False (no padding: the rows must be as long as each other for tensors), True / "longest",
    or "max_length" with `max_length`. Never truncates (an over-long row is an error)."""
    if return_tensors not in (None, "pt"):
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
    if not sequences:
        raise ValueError("nothing to encode: the batch is empty")
    rows = [list(s) for s in sequences]
    length = _padded_length([len(r) for r in rows], padding, max_length)
    if length is None:
        ids = _unpadded_ids(rows, return_tensors)
        masks = [[1] * len(r) for r in rows]
        positions = [list(range(len(r))) for r in rows]
        if return_tensors == "pt":
            return BatchEncoding(input_ids=ids, attention_mask=torch.tensor(masks), position_ids=torch.tensor(positions))
        return BatchEncoding(input_ids=ids, attention_mask=masks, position_ids=positions)
    ids, masks, positions = [], [], []
    for row in rows:
        pads = length - len(row)
        ids.append([pad_id] * pads + row)
        masks.append([0] * pads + [1] * len(row))
        positions.append([0] * pads + list(range(len(row))))
    encoding = BatchEncoding(input_ids=ids, attention_mask=masks, position_ids=positions)
    if return_tensors == "pt":
        encoding = BatchEncoding({key: torch.tensor(value, dtype=torch.long) for key, value in encoding.items()})
    return encoding


class CausalBatchCall:
    """`tokenizer(text_or_texts, ...)` for a causal tokenizer with one-text `encode`: the GLM-4 tokenizers."""

    pad_token_id: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def __call__(self, text: str | Sequence[str], padding: bool | str = False, max_length: int | None = None,
                 return_tensors: str | None = None, add_special_tokens: bool = True) -> BatchEncoding:
        """input_ids, attention_mask and position_ids, left-padded with the pad token (official shape)."""
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        encoding = causal_batch(rows, self.pad_token_id, padding, max_length, return_tensors)
        return single_or_batch(encoding, isinstance(text, str), return_tensors)


def single_or_batch(encoding: BatchEncoding, single: bool, return_tensors: str | None) -> BatchEncoding:
    """A single str with return_tensors=None gives unbatched lists, as HF tokenizers do."""
    if single and return_tensors is None:
        return BatchEncoding({key: value[0] for key, value in encoding.items()})
    return encoding


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, {} when the file is absent; a clear error when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
