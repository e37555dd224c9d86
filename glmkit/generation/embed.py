"""Embeddings from a GLM: the final norm's hidden states, pooled per family, unit length, in padded batches.

GLM has no official embedding head, so glmkit pools what each attention layout offers:

    causal (ChatGLM2/3, GLM-4, transformers' glm/glm4)   the last token's state: the one token that has read all
    prefix-LM (ChatGLM-6B, GLM-130B)                      the mean over every input token: each reads the whole
                                                          context both ways (up to <sop>)

and L2-normalizes the result, in fp32 whatever the model's dtype (as OpenAI's embeddings are unit length, a dot
product is the cosine). The ids are read as the model reads a prompt: the family's positions and mask
(`PositionLayout.sequence`); a prefix-LM input without <sop> (token ids a client sent) is all context.

A batch is left-padded, each row with its own positions and mask (glmkit.models.positions.pad_layouts): nothing
reads a pad, so an input gets the same vector alone or in any batch. GLM.hidden_states skips the output layer,
the vocabulary-wide product that would be most of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from glmkit.models.glm import GLM
from glmkit.models.positions import MissingSopError, pad_layouts

# Padded tokens (rows x the longest row) in one forward pass: bounds a batch's activations, and how long the
# server's engine pauses decoding for one batch. An input longer than this runs alone.
EMBED_BATCH_TOKENS = 8192
# The share of a batch's padded tokens that may be padding: a short input starts a new batch rather than be padded
# to four thirds of its length or more (on a CPU, the cost is the padded tokens; on a GPU, a few more batches
# cost little).
MAX_PADDING = 0.25
PAD_ID = 0  # what fills the padding: nothing reads it, and 0 is in every vocabulary


def pooling(model: GLM) -> str:
    """"last" (causal families) or "mean" (the prefix-LMs)."""
    return "last" if model.config.causal else "mean"


def check_inputs(model: GLM, sequences: Sequence[Sequence[int]]) -> None:
    """ValueError naming the first input that cannot be embedded: empty, longer than the context, or holding an id
    outside the vocabulary (which would fail inside the model)."""
    if not sequences:
        raise ValueError("there is nothing to embed: the list of inputs is empty")
    context, vocab = model.config.max_sequence_length, model.config.vocab_size
    for i, ids in enumerate(sequences):
        if not ids:
            raise ValueError(f"input {i} is empty: there is nothing to embed")
        if len(ids) > context:
            raise ValueError(f"input {i} has {len(ids)} tokens, more than the model's context of {context}; "
                             "shorten it")
        if (bad := next((t for t in ids if not 0 <= t < vocab), None)) is not None:
            raise ValueError(f"input {i} holds token id {bad}, outside the model's vocabulary (0 to {vocab - 1})")


def plan_batches(lengths: Sequence[int], budget: int = EMBED_BATCH_TOKENS,
                 max_padding: float = MAX_PADDING) -> list[list[int]]:
    """The inputs' indices grouped into forward passes, longest first: each batch at most `budget` padded tokens
    (rows x its longest row; an input longer than that runs alone), at most `max_padding` of them pads."""
    batches: list[list[int]] = []
    real = 0  # the last batch's tokens that are not padding
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            padded = (len(batches[-1]) + 1) * lengths[batches[-1][0]]
            if padded <= budget and real + lengths[i] >= (1 - max_padding) * padded:
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def embedding_layout(model: GLM, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [P, L], blocked [L, L]) as the model reads `ids` as a prompt; a prefix-LM input without <sop>
    is all context (positions 0..L-1, the block plane 0, nothing blocked)."""
    layout = model.position_layout
    try:
        return layout.sequence(ids, model.special_ids, prefer_gmask=False)
    except MissingSopError:
        positions = torch.zeros(layout.planes, len(ids), dtype=torch.long)
        positions[0] = torch.arange(len(ids))
        return positions, torch.zeros(len(ids), len(ids), dtype=torch.bool)


@torch.inference_mode()
def embed_batch(model: GLM, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """[len(sequences), hidden] fp32 unit vectors from one forward pass (the inputs already checked)."""
    batch = {k: v.to(model.device) for k, v in pad_layouts(sequences, lambda ids: embedding_layout(model, ids),
                                                           PAD_ID).items()}
    hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["attention_mask"]).float()
    if model.config.causal:
        pooled = hidden[:, -1]  # left padding: every row's last token is in the last column
    else:
        width = hidden.shape[1]
        lengths = torch.tensor([len(ids) for ids in sequences], device=hidden.device)
        real = torch.arange(width, device=hidden.device)[None, :] >= (width - lengths)[:, None]  # [B, L]
        # where, not a product: a pad row's state is never read, and 0 * inf would be NaN.
        pooled = torch.where(real[..., None], hidden, 0.0).sum(dim=1) / lengths[:, None]
    return F.normalize(pooled, dim=-1)


@torch.inference_mode()
def embed(model: GLM, sequences: Sequence[Sequence[int]], batch_tokens: int = EMBED_BATCH_TOKENS) -> torch.Tensor:
    """Unit-length embeddings [N, hidden] (fp32, on the model's device) of N token-id inputs, in the inputs'
    order, run in batches of at most `batch_tokens` padded tokens."""
    check_inputs(model, sequences)
    out = torch.empty(len(sequences), model.config.hidden_size, device=model.device)
    for rows in plan_batches([len(ids) for ids in sequences], batch_tokens):
        out[rows] = embed_batch(model, [sequences[i] for i in rows])
    return out
