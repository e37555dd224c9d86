"""GLM-4-9B's tokenizer: byte-level BPE in tiktoken's ranks format (`tokenizer.model`), specials after the ranks.

Why tiktoken: the file *is* a tiktoken ranks file (one `base64(bytes) rank` per line) and tiktoken merges by
rank exactly as the official `ChatGLM4Tokenizer` does, with GLM-4's pre-tokenizer regex (cl100k_base's). The
specials are HF added tokens in the official code: they are cut out of the text *before* BPE, so special
strings typed in text do become special ids (spec 3.3, pitfall 18) - unlike ChatGLM3. Decoding follows the slow
tokenizer: byte tokens joined and decoded as UTF-8 (errors replaced), specials as their text, by default with
one space between pieces around every special (pitfall 22).
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tiktoken
import torch

from glmkit.text.batching import CausalBatchCall, read_json, write_json
from glmkit.text.chat_format import ChatFormat
from glmkit.text.chat_template import GLM4_CHAT_TEMPLATE, ChatTemplateMixin
from glmkit.text.glm4_format import GLM4, GLM4PromptIds
from glmkit.text.replies import ParsesReplies
from glmkit.text.tokenizer import _id_list

VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
_RANK_LINE = re.compile(r"^([A-Za-z0-9+/]+=*) (\d+)$")


def read_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a tiktoken file; a clear error unless every line is `base64 rank` and ranks are 0..n-1."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a tiktoken ranks file (not UTF-8 text: a SentencePiece model?)") from error
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        match = _RANK_LINE.match(line)
        if match is None:
            raise ValueError(f"{path} line {number} is not 'base64-token rank': {line[:60]!r}")
        ranks[base64.b64decode(match.group(1))] = int(match.group(2))
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not the ids 0..{len(ranks) - 1} without gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]}): not byte-level")
    return ranks


def specials_from_config(config: Mapping[str, Any], first_id: int) -> dict[str, int]:
    """Special name -> id: from `added_tokens_decoder` (July 2024 files) or, as the June 2024 release computed
    them, len(ranks) + index in GLM-4's order. They must sit after the ranks."""
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        return {name: first_id + i for i, name in enumerate(GLM4_SPECIALS)}
    specials = {entry["content"]: int(index) for index, entry in decoder.items()}
    inside = sorted(name for name, index in specials.items() if index < first_id)
    if inside:
        raise ValueError(f"tokenizer_config.json gives {inside} ids inside the BPE ranks (0..{first_id - 1})")
    return specials


class GLM4Tokenizer(GLM4PromptIds, CausalBatchCall, ChatTemplateMixin, ParsesReplies):
    """glm-4-9b-chat's `ChatGLM4Tokenizer` (tiktoken ranks + GLM-4 specials + the repo's chat template)."""

    reply_format: ClassVar[ChatFormat] = GLM4

    family = "glm4"

    def __init__(self, vocab_file: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = GLM4_CHAT_TEMPLATE) -> None:
        """`config`: tokenizer_config.json's object (its added_tokens_decoder gives the specials' ids)."""
        self.vocab_file = Path(vocab_file)
        self.ranks = read_ranks(self.vocab_file)
        self.special_tokens = specials_from_config(config or {}, len(self.ranks))
        self.index_special_tokens = {i: name for name, i in self.special_tokens.items()}
        self.chat_template = chat_template
        self.encoding = tiktoken.Encoding(name=f"glm4:{self.vocab_file}", pat_str=GLM4_PATTERN,
                                          mergeable_ranks=self.ranks, special_tokens={})
        self.id_to_bytes = {rank: token for token, rank in self.ranks.items()}
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    # ----- loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GLM4Tokenizer:
        """Load from a directory holding `tokenizer.model` and (optionally) `tokenizer_config.json`, whose
        `added_tokens_decoder` and `chat_template` are used when present."""
        directory = Path(path)
        vocab = directory / VOCAB_FILE
        if not vocab.is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise FileNotFoundError(f"{directory} has no {VOCAB_FILE} (found: {', '.join(found) or 'nothing'})")
        config = read_json(directory / CONFIG_FILE)
        return cls(vocab, config, chat_template=config.get("chat_template", GLM4_CHAT_TEMPLATE))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.model` and a July-2024-style tokenizer_config.json (added_tokens_decoder, template)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(self.id_to_bytes[i]).decode()} {i}" for i in range(len(self.ranks))]
        (directory / VOCAB_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        config: dict[str, Any] = {
            "added_tokens_decoder": {
                str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
                for name, i in sorted(self.special_tokens.items(), key=lambda item: item[1])
            },
            "additional_special_tokens": sorted(self.special_tokens, key=self.special_tokens.__getitem__),
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
            "clean_up_tokenization_spaces": False,
            "do_lower_case": False,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "remove_space": False,
            "tokenizer_class": "ChatGLM4Tokenizer",
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / CONFIG_FILE, config)
        return directory

    # ----- vocabulary

    @property
    def vocab_size(self) -> int:
        """The BPE ranks only (151329), as the official property; `len(tokenizer)` counts the specials too."""
        return len(self.ranks)

    def __len__(self) -> int:
        return max(len(self.ranks), max(self.special_tokens.values(), default=-1) + 1)

    @property
    def eos_token_id(self) -> int:
        return self.special_tokens["<|endoftext|>"]

    @property
    def pad_token_id(self) -> int:
        return self.special_tokens["<|endoftext|>"]

    def get_command(self, token: str) -> int:
        return self.special_tokens[token]

    def convert_tokens_to_ids(self, tokens: str | bytes | Sequence[str | bytes]) -> int | list[int]:
        """A special's name or a token's bytes (or its text, UTF-8 encoded) to its id; KeyError if unknown."""
        if isinstance(tokens, (str, bytes)):
            if isinstance(tokens, str) and tokens in self.special_tokens:
                return self.special_tokens[tokens]
            raw = tokens.encode("utf-8") if isinstance(tokens, str) else tokens
            if raw not in self.ranks:
                raise KeyError(f"{tokens!r} is neither a token nor a special of this vocabulary")
            return self.ranks[raw]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes (its BPE rank's), for grammars that constrain decoding; None for the specials."""
        return [self.id_to_bytes.get(i) for i in range(len(self))]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | bytes | list[str | bytes]:
        """Specials as their names, BPE tokens as their bytes (as the official slow tokenizer)."""
        if isinstance(ids, int):
            if ids in self.index_special_tokens:
                return self.index_special_tokens[ids]
            if ids not in self.id_to_bytes:
                raise IndexError(f"token id {ids} is neither a BPE token nor a special")
            return self.id_to_bytes[ids]
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    # ----- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True, encode_special_tokens: bool = False) -> list[int]:
        """Ids of `text`: special strings become special ids, every other chunk is BPE-encoded; `[gMASK] <sop>`
        in front when `add_special_tokens`. `encode_special_tokens` is accepted and unused (July 2024 file)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for chunk in self._special_split.split(text):
            if chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids += self.encoding.encode_ordinary(chunk)
        return [*self.prefix_ids, *ids] if add_special_tokens else ids

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False,
               spaces_between_special_tokens: bool = True) -> str:
        """Text of `ids` by the slow tokenizer's rule; ids with no token (embedding padding rows) give nothing."""
        parts: list[str] = []
        buffer = b""
        for index in _id_list(ids):
            if index in self.index_special_tokens:
                if skip_special_tokens:
                    continue
                if buffer:
                    parts.append(buffer.decode("utf-8", errors="replace"))
                    buffer = b""
                parts.append(self.index_special_tokens[index])
            elif index in self.id_to_bytes:
                buffer += self.id_to_bytes[index]
        if buffer:
            parts.append(buffer.decode("utf-8", errors="replace"))
        return (" " if spaces_between_special_tokens else "").join(parts)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor, **options: bool) -> list[str]:
        return [self.decode(ids, **options) for ids in batch]

