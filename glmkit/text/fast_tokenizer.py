"""The -hf and 0414 repos' tokenizer: `tokenizer.json` (HF fast format) read by the `tokenizers` library.

Why a separate class: glm-4-9b-chat-hf, GLM-4-0414 and GLM-Z1 ship no tiktoken file and no remote code, only
`tokenizer.json` (converted from GLM-4's tiktoken ranks: same ids and specials) and a `tokenizer_config.json`
whose `chat_template` is the chat format. Whether plain encoding adds `[gMASK]<sop>` is decided by that file's
post-processor (spec 3.4): glmkit follows the file, as transformers does, and the chat template writes the prefix
itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from tokenizers import Tokenizer as FastTokenizer

from glmkit.text.batching import CausalBatchCall, read_json, write_json
from glmkit.text.chat_format import ChatFormat
from glmkit.text.chat_template import ChatTemplateMixin
from glmkit.text.glm4_format import GLM4, GLM4PromptIds
from glmkit.text.replies import ParsesReplies
from glmkit.text.tokenizer import _id_list

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character -> the byte it stands for (GPT-2's table: printable Latin-1
    bytes stand for themselves, the other 68 bytes map to U+0100 onwards in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


class GLMFastTokenizer(GLM4PromptIds, CausalBatchCall, ChatTemplateMixin, ParsesReplies):
    """A GLM-4 family fast tokenizer: ids, decode and specials from `tokenizer.json`, eos/pad and the chat
    template from `tokenizer_config.json`."""

    reply_format: ClassVar[ChatFormat] = GLM4

    family = "glm4"

    def __init__(self, tokenizer_file: str | os.PathLike, config: dict | None = None) -> None:
        self.tokenizer_file = Path(tokenizer_file)
        try:
            self.tokenizer = FastTokenizer.from_file(str(self.tokenizer_file))
        except Exception as error:  # the Rust library raises a bare Exception
            raise ValueError(f"{self.tokenizer_file} is not a tokenizers tokenizer.json ({error})") from error
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # the list-of-named-templates form: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self.special_tokens = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        for name in ("[gMASK]", "<sop>", "[MASK]"):
            if name not in self.special_tokens:
                raise ValueError(f"{self.tokenizer_file} has no {name} added token: not a GLM-4 family tokenizer")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> GLMFastTokenizer:
        directory = Path(path)
        if not (directory / TOKENIZER_FILE).is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise FileNotFoundError(f"{directory} has no {TOKENIZER_FILE} (found: {', '.join(found) or 'nothing'})")
        return cls(directory / TOKENIZER_FILE, read_json(directory / CONFIG_FILE))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "padding_side": "left", **self.config}
        write_json(directory / CONFIG_FILE, config)
        return directory

    # ----- vocabulary

    def _named(self, key: str, default: str) -> int:
        value = self.config.get(key, default)
        name = value.get("content", default) if isinstance(value, dict) else value
        if name not in self.special_tokens:
            raise ValueError(f"{CONFIG_FILE} names {key} {name!r}, which is not a token of {self.tokenizer_file}")
        return self.special_tokens[name]

    @property
    def vocab_size(self) -> int:
        """Without the added tokens, as transformers' `vocab_size`; `len()` counts them."""
        return self.tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._size

    @functools.cached_property
    def _size(self) -> int:
        # Asked once: the tokenizers library builds the whole vocabulary to count the added tokens (~70 ms at
        # GLM-4's 151K), and decode checks every id against it.
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self._named("eos_token", "<|endoftext|>")

    @property
    def pad_token_id(self) -> int:
        return self._named("pad_token", "<|endoftext|>")

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int] | None:
        if isinstance(tokens, str):
            return self.tokenizer.token_to_id(tokens)
        return [self.tokenizer.token_to_id(t) for t in tokens]

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes, for grammars that constrain decoding: the model's tokens are byte-level BPE (GLM-4's
        ranks, converted), each character standing for one byte; None for the added tokens (the specials)."""
        table = byte_level_alphabet()
        out: list[bytes | None] = [None] * len(self)
        for token, index in self.tokenizer.get_vocab(with_added_tokens=False).items():
            if any(c not in table for c in token):
                raise ValueError(f"{self.tokenizer_file}: token {token!r} is not byte-level BPE, so its bytes are "
                                 "unknown (grammar-constrained decoding needs them)")
            out[index] = bytes(table[c] for c in token)
        return out

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.tokenizer.id_to_token(ids)
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    # ----- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` (added tokens in the text always match); the prefix only if the file's post-processor
        adds it."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        known = [i for i in _id_list(ids) if 0 <= i < len(self)]  # embedding padding rows have no token
        return self.tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

