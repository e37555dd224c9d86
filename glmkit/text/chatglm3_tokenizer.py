"""ChatGLM2's and ChatGLM3's tokenizer: SentencePiece `tokenizer.model` with GLM's specials after the pieces.

Why a new class rather than `ChatGLMTokenizer`: ChatGLM2/3 share nothing of ChatGLM-6B's id layout. Their
SentencePiece file keeps newlines and space runs itself (byte fallback, no `<n>`/blank pieces), the specials
are *not* pieces but ids appended after them (spec 3.1), and `[gMASK] sop` is a prefix, not a suffix.

The two families share one file and differ only in the specials table and the decode rule, so ChatGLM3 is a
subclass with four more specials (the role tokens). Role tokens can never come from text unless
`encode_special_tokens` is set, by design (the official PROMPT_en.md: against prompt injection); prompts are
therefore built as ids, message by message (`build_chat_input`), never by encoding a rendered string.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import sentencepiece as spm
import torch

from glmkit.models.positions import SpecialIds
from glmkit.text.batching import causal_batch, read_json, single_or_batch, write_json
from glmkit.text.chat_format import CHATGLM2, ChatFormat
from glmkit.text.chatglm3_format import CHATGLM3
from glmkit.text.replies import ParsesReplies
from glmkit.text.tokenizer import BatchEncoding, _id_list, _pair_up, sentencepiece_bytes

VOCAB_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
CHATGLM2_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
CHATGLM3_SPECIALS = (*CHATGLM2_SPECIALS, *ROLE_TOKENS)
CHATGLM3_ROLES = ("system", "user", "assistant", "observation")


class ChatGLM2Tokenizer(ParsesReplies):
    """ChatGLM2-6B's tokenizer (the official `tokenization_chatglm.py` behaviours, without transformers).

    Ids: the SentencePiece pieces (`<unk>` 0 = pad, `<s>` 1, `</s>` 2 = eos, byte pieces from 3), then the
    specials in `SPECIALS` order. `encode` prepends `[gMASK] sop`; decode drops every special (ChatGLM2's rule).
    """

    reply_format: ClassVar[ChatFormat] = CHATGLM2

    family: ClassVar[str] = "chatglm2"
    SPECIALS: ClassVar[tuple[str, ...]] = CHATGLM2_SPECIALS
    ROLE_TOKENS: ClassVar[tuple[str, ...]] = ()  # what encode_special_tokens may split out of text

    def __init__(self, vocab_file: str | os.PathLike, encode_special_tokens: bool = False) -> None:
        self.vocab_file = Path(vocab_file)
        self.sp = _load(self.vocab_file)
        self.encode_special_tokens = encode_special_tokens
        self.num_pieces = self.sp.get_piece_size()
        self.special_tokens = {name: self.num_pieces + i for i, name in enumerate(self.SPECIALS)}
        self.index_special_tokens = {i: name for name, i in self.special_tokens.items()}
        self._roles = re.compile("|".join(re.escape(t) for t in self.ROLE_TOKENS)) if self.ROLE_TOKENS else None

    # ----- loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ChatGLM2Tokenizer:
        """Load from a model directory holding `tokenizer.model` (and optionally tokenizer_config.json)."""
        directory = Path(path)
        if not (directory / VOCAB_FILE).is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise FileNotFoundError(f"{directory} has no {VOCAB_FILE} (found: {', '.join(found) or 'nothing'})")
        config = read_json(directory / CONFIG_FILE)
        return cls(directory / VOCAB_FILE, encode_special_tokens=bool(config.get("encode_special_tokens", False)))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.model` and an official-style `tokenizer_config.json` (HF's AutoTokenizer with
        trust_remote_code reads the same keys; `name_or_path` tells ChatGLM2 from ChatGLM3 when reloading)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_bytes(self.sp.serialized_model_proto())
        config = {
            "name_or_path": f"THUDM/{self.family}-6b",
            "remove_space": False,
            "do_lower_case": False,
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            "glmkit_family": self.family,
        }
        if self.ROLE_TOKENS:
            config["encode_special_tokens"] = self.encode_special_tokens
        write_json(directory / CONFIG_FILE, config)
        return directory

    # ----- vocabulary

    @property
    def vocab_size(self) -> int:
        """Pieces plus specials (64794 for ChatGLM2, 64798 for ChatGLM3), as the official property."""
        return self.num_pieces + len(self.SPECIALS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_token_id(self) -> int:
        return self.sp.unk_id()

    @property
    def unk_token_id(self) -> int:
        return self.sp.unk_id()

    @property
    def gmask_token_id(self) -> int:
        return self.special_tokens["[gMASK]"]

    @property
    def sop_token_id(self) -> int:
        return self.special_tokens["sop"]

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds(bos=self.sop_token_id, mask=self.special_tokens["[MASK]"], gmask=self.gmask_token_id,
                          pad=self.pad_token_id)

    @property
    def prefix_ids(self) -> list[int]:
        """`[gMASK] sop`: the start of every prompt."""
        return [self.gmask_token_id, self.sop_token_id]

    def get_command(self, token: str) -> int:
        """A special token's id (the official name for it); KeyError for anything else."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of {self.family} (specials: {list(self.SPECIALS)})")
        return self.special_tokens[token]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Special names or pieces to ids; an unknown piece gives `<unk>` (0)."""
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes in decoded text, for grammars that constrain decoding; None for the specials and the
        control pieces (never text a grammar can match)."""
        return [*(sentencepiece_bytes(self.sp, i) for i in range(self.num_pieces)), *[None] * len(self.SPECIALS)]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            if ids in self.index_special_tokens:
                return self.index_special_tokens[ids]
            if not 0 <= ids < self.num_pieces:
                raise IndexError(f"token id {ids} is outside the vocabulary (0..{self.vocab_size - 1})")
            return self.sp.id_to_piece(ids)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    # ----- encoding

    def tokenize(self, text: str, encode_special_tokens: bool | None = None) -> list[str]:
        """SentencePiece pieces of `text`. With `encode_special_tokens` (ChatGLM3) the four role tokens are cut
        out of the text first and each remaining chunk is a separate SentencePiece call (own dummy "▁")."""
        split = self.encode_special_tokens if encode_special_tokens is None else encode_special_tokens
        if not split or self._roles is None:
            return self.sp.encode(text, out_type=str)
        pieces, start = [], 0
        for match in self._roles.finditer(text):
            if match.start() > start:
                pieces += self.sp.encode(text[start:match.start()], out_type=str)
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces += self.sp.encode(text[start:], out_type=str)
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True, encode_special_tokens: bool | None = None) -> list[int]:
        """Ids of `text`, with `[gMASK] sop` in front when `add_special_tokens`. Special strings in the text
        stay text (unless `encode_special_tokens` and they are role tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        split = self.encode_special_tokens if encode_special_tokens is None else encode_special_tokens
        if split and self._roles is not None:
            ids = self.convert_tokens_to_ids(self.tokenize(text, True))
        else:
            ids = self.sp.encode(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, ids_a: Sequence[int], ids_b: Sequence[int] | None = None) -> list[int]:
        """`[gMASK] sop A`, or for a training pair `[gMASK] sop A B </s>`."""
        ids = [*self.prefix_ids, *ids_a]
        if ids_b is not None:
            ids += [*ids_b, self.eos_token_id]
        return ids

    # ----- decoding

    def _decoded_piece(self, index: int) -> str:
        """ChatGLM2: every special id and `<unk>`/`<s>`/`</s>` decode to nothing."""
        if index in self.index_special_tokens or index in (self.sp.eos_id(), self.sp.bos_id(), self.sp.unk_id()):
            return ""
        return self.sp.id_to_piece(index) if 0 <= index < self.num_pieces else ""

    def decode(self, ids: int | Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids` by the family's rule; ids past the specials (embedding padding rows) give nothing."""
        pieces = []
        for index in _id_list(ids):
            if skip_special_tokens and index in self.index_special_tokens:
                continue
            piece = self._decoded_piece(index)
            if piece:
                pieces.append(piece)
        return self.sp.decode_pieces(pieces)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    # ----- batches

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        padding: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch: input_ids, attention_mask and position_ids, left-padded (official shape)."""
        rows = []
        for a, b in _pair_up(text, text_pair):
            ids_a = self.encode(a, add_special_tokens=False)
            ids_b = None if b is None else self.encode(b, add_special_tokens=False)
            rows.append(self.build_inputs_with_special_tokens(ids_a, ids_b) if add_special_tokens
                        else ids_a + (ids_b or []))
        encoding = causal_batch(rows, self.pad_token_id, padding, max_length, return_tensors)
        return single_or_batch(encoding, isinstance(text, str), return_tensors)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B's tokenizer: ChatGLM2's plus the role tokens, a decode that keeps specials as their text,
    and the message-by-message prompt builder (`build_single_message`, `build_chat_input`)."""

    reply_format: ClassVar[ChatFormat] = CHATGLM3

    family: ClassVar[str] = "chatglm3"
    SPECIALS: ClassVar[tuple[str, ...]] = CHATGLM3_SPECIALS
    ROLE_TOKENS: ClassVar[tuple[str, ...]] = ROLE_TOKENS

    def _decoded_piece(self, index: int) -> str:
        """ChatGLM3: a special id decodes to its literal name (SentencePiece emits an unknown piece verbatim);
        `<unk>`/`<s>`/`</s>` and ids past the specials decode to nothing."""
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        return super()._decoded_piece(index)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """`<|role|>` + sp(f"{metadata}\\n") + sp(message): two separate SentencePiece calls, so both the
        newline and the content start with their own dummy "▁" (spec 3.2, pitfall 17)."""
        if role not in CHATGLM3_ROLES:
            raise ValueError(f"unknown role {role!r}: ChatGLM3 knows {list(CHATGLM3_ROLES)}")
        return [self.get_command(f"<|{role}|>"), *self.sp.encode(f"{metadata}\n"), *self.sp.encode(message)]

    def build_chat_input(
        self, query: str, history: Sequence[Mapping[str, Any]] | None = None, role: str = "user"
    ) -> BatchEncoding:
        """The official prompt builder: `[gMASK] sop`, each history message, the query as a message of `role`,
        then `<|assistant|>`; a batch of one (tensors) with attention_mask and position_ids."""
        ids = list(self.prefix_ids)
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return causal_batch([ids], self.pad_token_id, return_tensors="pt")


def _load(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as error:
        raise ValueError(f"{path} is not a valid SentencePiece model ({error})") from error
    if sp.eos_id() < 0 or sp.unk_id() < 0:
        raise ValueError(f"{path} has no </s> or <unk> piece: it is not a ChatGLM2/3 tokenizer.model")
    return sp
