"""Train a GLM-4 `tokenizer.model` (tiktoken ranks) whose tokens never cross a value's boundary.

GLM-4's pre-tokenizer (GLM4_PATTERN) attaches one leading non-letter to a letter run and keeps a run of Chinese
characters whole, so BPE trained on its pre-tokens learns " Paris" (question) apart from `"Paris` (a JSON call)
and fuses 北京 with the characters around it: a small model then has to *translate* a value into other tokens
to copy it into a call. These ranks are learned on finer pieces instead (`TRAINING_PATTERN`): letter runs apart
from what precedes them, every Chinese character alone, every digit alone. No token therefore joins
space/punctuation to letters, two Chinese characters, or two digits, and tiktoken's rank-order merging over GLM-4's
own pattern can only rebuild those pieces: a value is spelled with the same ids wherever it appears.

The trainer is the `tokenizers` library's byte-level BPE; the export lists the 256 single bytes first and then
every merge's token in merge order, which is the order tiktoken applies them in.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path

# Letters other than Chinese characters | one Chinese character | one digit | GLM-4's non-letter pieces.
TRAINING_PATTERN = (
    r"[\p{L}&&[^\p{Han}]]+|\p{Han}|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in character of each byte (GPT-2's table) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def train_ranks(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> list[bytes]:
    """The tokens of a byte-level BPE trained on `texts` split by TRAINING_PATTERN, in rank order: the 256
    single bytes (rank = byte value), then each merge's result in the order the trainer learned them."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers  # only needed to train

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TRAINING_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=min_frequency)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    table = byte_decoder()
    ranks = [bytes([b]) for b in range(256)]
    seen = set(ranks)
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = bytes(table[c] for c in left + right)
        if token not in seen:
            seen.add(token)
            ranks.append(token)
    return ranks


def write_ranks(tokens: list[bytes], path: Path) -> Path:
    """A tiktoken ranks file: `base64(token) rank` per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)), encoding="utf-8")
    return path


def crossing_tokens(tokens: Iterable[bytes]) -> list[bytes]:
    """Tokens that break the rule (a non-letter joined to letters, two Chinese characters, two digits): none in
    a file from `train_ranks`; for tests."""
    import regex

    piece = regex.compile(TRAINING_PATTERN.replace("[\\p{L}&&[^\\p{Han}]]+", "(?:(?!\\p{Han})\\p{L})+"))
    bad = []
    for token in tokens:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of one multi-byte character
        if len(piece.findall(text)) > 1:
            bad.append(token)
    return bad
