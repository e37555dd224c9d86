"""ChatGLM-6B's tokenizer, and a trainer for new vocabularies with the same layout.

Why this module exists rather than the official `tokenization_chatglm.py`:
  * the official class needs `transformers` (and its first release `icetk`); glmkit runs on torch and
    sentencepiece alone, so the few behaviours that matter are reimplemented here against the spec;
  * the model's inputs depend on exact ids: `[gMASK] <sop>` closes every prompt, pads go on the left,
    and the tokenizer's padding path builds its own positions and mask (see `glmkit.models.positions`);
  * code and whitespace survive because spaces, tabs and newlines are rewritten to dedicated pieces
    before SentencePiece sees the text (SentencePiece would otherwise merge or drop them);
  * special ids are read from the model file, never hard-coded, because two id layouts exist in the
    wild (with 20000 image tokens in front, and without) and small trained vocabularies differ again.

`train_sentencepiece` exists so that tests, experiments and new small models get a vocabulary whose
special pieces sit in the released order, so nothing downstream needs a special case for them.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import sentencepiece as spm
import torch

from glmkit.models.positions import SpecialIds, padded_layout
from glmkit.text.chat_format import CHATGLM_6B, ChatFormat
from glmkit.text.replies import ParsesReplies

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILES = (VOCAB_FILE, CONFIG_FILE)  # what a model directory holds of its tokenizer
MODEL_CONFIG_FILE = "config.json"
MAX_BLANK_LENGTH = 80
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"
SPACE_PIECE = "\u2581"  # SentencePiece's visible space; alone it is the dummy prefix of every text
META_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
BYTE_PIECES = tuple(f"<0x{i:02X}>" for i in range(256))
REQUIRED_SPECIALS = ("<unk>", "<pad>", NEWLINE_PIECE, "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")

_SPACE_RUN = re.compile(" {2,}")
_WORD_DELIMITER = "\uf8ff"  # a private-use character: SentencePiece cuts at it while training and drops it
_WHITESPACE_PIECE = re.compile(r"<n>|<\|tab\|>|<\|blank_(\d+)\|>")


def blank_piece(length: int) -> str:
    """The piece that stands for a run of `length` (2..80) spaces."""
    return f"<|blank_{length}|>"


def whitespace_pieces(max_blank_length: int = MAX_BLANK_LENGTH) -> list[str]:
    """`<|tab|>` and the blank pieces, in their id order."""
    return [TAB_PIECE] + [blank_piece(n) for n in range(2, max_blank_length + 1)]


def preprocess(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Rewrite newlines, tabs and space runs (longest first) into their pieces, as the official code does."""
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)

    def blanks(match: re.Match[str]) -> str:
        full, rest = divmod(len(match.group()), max_blank_length)
        tail = blank_piece(rest) if rest >= 2 else " " * rest
        return blank_piece(max_blank_length) * full + tail

    return _SPACE_RUN.sub(blanks, text)


def postprocess(text: str, max_blank_length: int = MAX_BLANK_LENGTH) -> str:
    """Undo `preprocess` on decoded text."""

    def restore(match: re.Match[str]) -> str:
        if match.group() == NEWLINE_PIECE:
            return "\n"
        if match.group() == TAB_PIECE:
            return "\t"
        length = int(match.group(1))
        return " " * length if 2 <= length <= max_blank_length else match.group()

    return _WHITESPACE_PIECE.sub(restore, text)


class BatchEncoding(dict):
    """The tokenizer's output: a dict of input_ids (and, when padded, attention_mask and position_ids)."""

    def to(self, device: torch.device | str) -> BatchEncoding:
        """Move every tensor to `device` (in place) and return self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ChatGLMTokenizer(ParsesReplies):
    """ChatGLM-6B's tokenizer over a SentencePiece model (`ice_text.model`).

    Ids are SentencePiece ids plus `num_image_tokens` (20000 in the first release, 0 since).
    Decoding drops pads, image tokens and ids past the vocabulary (the released embedding has
    padding rows there), and control pieces decode to nothing.
    """

    reply_format: ClassVar[ChatFormat] = CHATGLM_6B

    def __init__(self, vocab_file: str | os.PathLike, num_image_tokens: int = 0, max_blank_length: int = 80) -> None:
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        if max_blank_length < 2:
            raise ValueError(f"max_blank_length must be >= 2, got {max_blank_length}")
        self.vocab_file = Path(vocab_file)
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = max_blank_length
        self.sp = _load_processor(self.vocab_file)
        _check_pieces(self.sp, self.vocab_file, [*REQUIRED_SPECIALS, *whitespace_pieces(max_blank_length)])

    # ----- loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ChatGLMTokenizer:
        """Load from a model directory holding `ice_text.model` (and optionally tokenizer_config.json)."""
        directory = Path(path)
        if not directory.exists():
            raise FileNotFoundError(
                f"tokenizer directory {directory} does not exist: pass the model directory that holds {VOCAB_FILE}"
            )
        if not directory.is_dir():
            raise ValueError(
                f"{directory} is a file, not a model directory; pass its directory, "
                f"or load a single model file with ChatGLMTokenizer({str(directory)!r})"
            )
        vocab = directory / VOCAB_FILE
        if not vocab.is_file():
            raise FileNotFoundError(
                f"{directory} has no {VOCAB_FILE}: copy it from the original model (THUDM/chatglm-6b) "
                "or train one with glmkit.text.tokenizer.train_sentencepiece"
            )
        tokenizer = cls(vocab)
        tokenizer.num_image_tokens = _num_image_tokens(directory, tokenizer.sp.piece_to_id("<sop>"))
        return tokenizer

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `ice_text.model` and an official-style `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_bytes(self.sp.serialized_model_proto())
        config = {
            "bos_token": "<sop>",
            "eos_token": "<eop>",
            "eop_token": "<eop>",
            "gmask_token": "[gMASK]",
            "mask_token": "[MASK]",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "remove_space": False,
            "do_lower_case": False,
            "num_image_tokens": self.num_image_tokens,
            "tokenizer_class": "ChatGLMTokenizer",
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    # ----- vocabulary

    def _piece_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece) + self.num_image_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._piece_id("<pad>")

    @property
    def unk_token_id(self) -> int:
        return self._piece_id("<unk>")

    @property
    def bos_token_id(self) -> int:
        return self._piece_id("<sop>")

    @property
    def eos_token_id(self) -> int:
        return self._piece_id("<eop>")

    @property
    def eop_token_id(self) -> int:
        return self.eos_token_id

    @property
    def mask_token_id(self) -> int:
        return self._piece_id("[MASK]")

    @property
    def gmask_token_id(self) -> int:
        return self._piece_id("[gMASK]")

    @property
    def smask_token_id(self) -> int:
        return self._piece_id("[sMASK]")

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds(
            bos=self.bos_token_id, mask=self.mask_token_id, gmask=self.gmask_token_id, pad=self.pad_token_id
        )

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Piece(s) to id(s); unknown pieces give the `<unk>` id, `<image_N>` gives N."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str) -> int:
        image = re.fullmatch(r"<image_(\d+)>", token)
        if image and int(image.group(1)) < self.num_image_tokens:
            return int(image.group(1))
        return self._piece_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise IndexError(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes in decoded text, for grammars that constrain decoding (None: never text: image tokens,
        control pieces, `<unk>`). `<n>`, `<|tab|>` and `<|blank_N|>` are the whitespace they decode to. Every other
        piece holding "<" is None: decode rewrites those names wherever they appear in the text, so "<" then "n>"
        would come out as a newline, not the bytes a grammar allowed (JSON still writes "<" as \\u003c)."""
        out: list[bytes | None] = [None] * self.num_image_tokens
        for index in range(self.sp.get_piece_size()):
            piece = self.sp.id_to_piece(index)
            if _WHITESPACE_PIECE.fullmatch(piece):
                out.append(postprocess(piece, self.max_blank_length).encode("utf-8"))
                continue
            raw = sentencepiece_bytes(self.sp, index)
            out.append(None if raw is None or b"<" in raw else raw)
        return out

    # ----- encoding and decoding

    def tokenize(self, text: str) -> list[str]:
        """The SentencePiece pieces of `text` after whitespace pre-processing (no special tokens)."""
        return self.sp.encode(preprocess(text, self.max_blank_length), out_type=str)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, closed by `[gMASK] <sop>` when `add_special_tokens`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [i + self.num_image_tokens for i in self.sp.encode(preprocess(text, self.max_blank_length))]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, ids_a: Sequence[int], ids_b: Sequence[int] | None = None) -> list[int]:
        """`A [gMASK] <sop>`, or for a training pair `A [gMASK] <sop> B <eop>`."""
        ids = [*ids_a, self.gmask_token_id, self.bos_token_id]
        if ids_b is not None:
            ids += [*ids_b, self.eos_token_id]
        return ids

    def decode(self, ids: int | Sequence[int] | torch.Tensor) -> str:
        """Text of `ids`; pads, image tokens, out-of-vocabulary ids and control pieces give nothing."""
        pieces = [i - self.num_image_tokens for i in _id_list(ids) if i != self.pad_token_id]
        pieces = [i for i in pieces if 0 <= i < self.sp.get_piece_size()]
        return postprocess(self.sp.decode(pieces), self.max_blank_length)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        return [self.decode(ids) for ids in batch]

    # ----- batches

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        padding: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Encode one text or a batch, with `[gMASK] <sop>` appended (and `B <eop>` for pairs).

        Without padding only `input_ids` is returned: the model derives positions and mask itself.
        With padding (True / "longest" / "max_length") the batch is left-padded and carries the
        tokenizer-path `attention_mask` [B, 1, L, L] (True = blocked) and `position_ids` [B, 2, L].
        A single str with return_tensors=None gives unbatched lists; with "pt", a batch of one."""
        single = isinstance(text, str)
        pairs = _pair_up(text, text_pair)
        sequences = [
            self.build_inputs_with_special_tokens(
                self.encode(a, add_special_tokens=False),
                None if b is None else self.encode(b, add_special_tokens=False),
            )
            for a, b in pairs
        ]
        encoding = self.pad(sequences, padding=padding, max_length=max_length, return_tensors=return_tensors)
        if single and return_tensors is None:
            return BatchEncoding({key: value[0] for key, value in encoding.items()})
        return encoding

    def pad(
        self,
        sequences: Sequence[Sequence[int]],
        padding: bool | str = True,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Batch already-encoded sequences (each must hold `<sop>`) the way `__call__` does."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if not sequences:
            raise ValueError("nothing to encode: the batch is empty")
        length = _padded_length([len(s) for s in sequences], padding, max_length)
        if length is None:
            return BatchEncoding(input_ids=_unpadded_ids(sequences, return_tensors))
        layout = padded_layout([list(s) for s in sequences], self.special_ids, length)
        if return_tensors is None:
            layout = {key: value.tolist() for key, value in layout.items()}
        return BatchEncoding(layout)


# ----- helpers for the tokenizer


def sentencepiece_bytes(sp: spm.SentencePieceProcessor, index: int) -> bytes | None:
    """The bytes piece `index` adds to decoded text: a byte-fallback piece its byte, "▁" a space, None for a
    control, unknown or unused piece (they decode to nothing)."""
    if sp.is_control(index) or sp.is_unknown(index) or sp.is_unused(index):
        return None
    piece = sp.id_to_piece(index)
    if sp.is_byte(index):
        return bytes([int(piece[3:5], 16)])  # "<0x7B>"
    return piece.replace(SPACE_PIECE, " ").encode("utf-8")


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as error:
        raise ValueError(
            f"{path} is not a valid SentencePiece model ({error}); re-download {VOCAB_FILE} "
            "or train a new one with glmkit.text.tokenizer.train_sentencepiece"
        ) from error


def _check_pieces(sp: spm.SentencePieceProcessor, path: Path, required: Iterable[str]) -> None:
    missing = [piece for piece in required if sp.id_to_piece(sp.piece_to_id(piece)) != piece]
    if missing:
        raise ValueError(
            f"{path} is a SentencePiece model but lacks the ChatGLM special pieces {missing}; "
            "use ChatGLM's ice_text.model or train one with glmkit.text.tokenizer.train_sentencepiece, which adds them"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _num_image_tokens(directory: Path, sop_piece_id: int) -> int:
    """From tokenizer_config.json, else inferred from config.json's bos_token_id, else 0."""
    config = _read_json(directory / CONFIG_FILE)
    if config.get("num_image_tokens") is not None:
        if int(config["num_image_tokens"]) < 0:
            raise ValueError(f"{directory / CONFIG_FILE} has a negative num_image_tokens")
        return int(config["num_image_tokens"])
    bos = _read_json(directory / MODEL_CONFIG_FILE).get("bos_token_id")
    if bos is None:
        return 0
    if bos < sop_piece_id:
        raise ValueError(
            f"{directory / MODEL_CONFIG_FILE} has bos_token_id {bos}, below <sop>'s id {sop_piece_id} in {VOCAB_FILE}: "
            f"the tokenizer does not belong to this model; set num_image_tokens in {CONFIG_FILE}"
        )
    return bos - sop_piece_id


def _id_list(ids: int | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence, got a tensor of shape {tuple(ids.shape)}; use batch_decode")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _pair_up(text: str | Sequence[str], text_pair: str | Sequence[str] | None) -> list[tuple[str, str | None]]:
    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TypeError("text is a single str, so text_pair must be a str too")
        return [(text, text_pair)]
    texts = list(text)
    if text_pair is None:
        return [(t, None) for t in texts]
    if isinstance(text_pair, str) or len(text_pair) != len(texts):
        raise ValueError("text_pair must be a list with one entry per text")
    return list(zip(texts, text_pair, strict=True))


def _padded_length(lengths: list[int], padding: bool | str, max_length: int | None) -> int | None:
    """The padded length for `padding`, or None for no padding."""
    if padding is False:
        if max_length is not None:
            raise ValueError("max_length only applies with padding='max_length' (this tokenizer never truncates)")
        return None
    if padding is True or padding == "longest":
        if max_length is not None:
            raise ValueError("max_length only applies with padding='max_length' (this tokenizer never truncates)")
        return max(lengths)
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if max(lengths) > max_length:
            raise ValueError(
                f"a sequence has {max(lengths)} tokens, more than max_length={max_length}; "
                "raise max_length or shorten the text (this tokenizer never truncates)"
            )
        return max_length
    raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")


def _unpadded_ids(sequences: Sequence[Sequence[int]], return_tensors: str | None) -> Any:
    ids = [list(s) for s in sequences]
    if return_tensors is None:
        return ids
    if len({len(s) for s in ids}) > 1:
        raise ValueError(
            f"the sequences have different lengths {[len(s) for s in ids]}, so they cannot form one tensor; "
            "pass padding=True"
        )
    return torch.tensor(ids, dtype=torch.long)


# ----- training


_LAYOUT_OPTIONS = frozenset(
    {
        "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece", "pad_piece",
        "user_defined_symbols", "control_symbols", "byte_fallback", "normalization_rule_name",
        "remove_extra_whitespaces", "split_digits", "add_dummy_prefix", "sentence_iterator", "model_writer",
        "input", "model_prefix",
    }
)  # fmt: skip
_SAMPLE_SIZE = 200
_PROBE = "Hello, 世界! 👋 龘\n\tx  =  [gMASK] <sop> 12345" + " " * 100 + "end "


def train_sentencepiece(
    texts: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 8,
    word_chunks: Callable[[str], Iterable[str]] | None = None,
    **options: Any,
) -> Path:
    """Train a SentencePiece model with ChatGLM's special pieces and id layout; write it to `output_dir`.

    `texts` yields documents (str, newlines allowed) and/or file paths (`os.PathLike`, e.g. pathlib.Path:
    one document per line). A plain str is always text, never a file name. Each document goes through
    the same newline/tab/space rewriting as encoding, so the trainer sees what encoding will feed it.
    `vocab_size` counts every piece, the 349 fixed ones (meta, control, whitespace, byte) included.
    The result is reproducible for a given `seed` and `num_threads` (the thread count changes the
    outcome, hence a fixed default rather than the machine's core count). `model_type`: "unigram"
    (ChatGLM's) or "bpe" ("word" models lack a lone `▁`, so spaces would not come back; this is
    checked). Other SentencePiece trainer options pass through `options` (e.g. hard_vocab_limit=False
    for a tiny corpus, minloglevel=0 for progress logs), except those that fix the layout.

    `word_chunks`, when given, cuts each pre-processed sentence into chunks (their concatenation must
    be the sentence) and no learned piece crosses a cut. This is for training only: encoding is
    unchanged. Chinese has no spaces, so without it text repeated thousands of times (templated chat
    data) fuses words into pieces like "国的首都", which split names where the template begins.

    Normalisation is "identity" with remove_extra_whitespaces=False and split_digits=True, so that
    decode(encode(text)) == text exactly. The released ice_text.model uses NFKC, which rewrites
    full-width punctuation to ASCII (and more) - the reason ChatGLM's `process_response` has to turn
    "," and "?" next to Chinese characters back into "，" and "？".

    The pieces are then reordered (scores and types kept) into the released layout: `<unk> <s> </s>
    <pad> <n> ▁`, the learned pieces, then `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>
    <|tab|> <|blank_2|>..<|blank_80|> <0x00>..<0xFF>`. Returns `output_dir`.
    """
    model_pb2 = _model_pb2()
    locked = sorted(_LAYOUT_OPTIONS & options.keys())
    if locked:
        raise ValueError(f"options {locked} would break ChatGLM's piece layout; they are fixed by train_sentencepiece")
    spec = _trainer_spec(vocab_size, model_type, character_coverage, input_sentence_size, num_threads, options)
    if word_chunks is not None:
        spec["pretokenization_delimiter"] = _WORD_DELIMITER
    feed = _SentenceFeed(texts, spec["max_sentence_length"], word_chunks)
    trained = _train(feed, spec, seed)
    reordered = _reorder(trained, model_pb2)
    _verify_reorder(trained, reordered, feed.sample)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / VOCAB_FILE).write_bytes(reordered)
    ChatGLMTokenizer(output_dir / VOCAB_FILE).save_pretrained(output_dir)
    return output_dir


def _model_pb2() -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:
        raise ImportError(
            "training a tokenizer needs protobuf (to reorder the trained pieces): "
            "pip install protobuf  (or pip install 'glmkit[train]')"
        ) from error
    return sentencepiece_model_pb2


def _trainer_spec(
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    input_sentence_size: int,
    num_threads: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "shuffle_input_sentence": True,
        "num_threads": num_threads,
        "max_sentence_length": 4192,
        "minloglevel": 1,
        **options,
        "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
        "unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>",
        "user_defined_symbols": [NEWLINE_PIECE, *whitespace_pieces()],
        "control_symbols": list(CONTROL_PIECES),
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "split_digits": True,
        "add_dummy_prefix": True,
    }  # fmt: skip
    return spec


def _documents(item: str | os.PathLike) -> Iterator[str]:
    if isinstance(item, str):
        yield item
    elif isinstance(item, os.PathLike):
        with open(item, encoding="utf-8") as lines:
            for line in lines:
                yield line.rstrip("\r\n")
    else:
        raise TypeError(f"texts must yield str or os.PathLike (a file), got {type(item).__name__}")


def _chunks(text: str, limit: int) -> Iterator[str]:
    """Pre-processed `text`, cut at `<n>` into sentences of at most `limit` bytes where possible."""
    if len(text.encode("utf-8")) <= limit:
        yield text
        return
    chunk = ""
    for line in re.split(r"(?<=<n>)", text):
        if chunk and len((chunk + line).encode("utf-8")) > limit:
            yield chunk
            chunk = ""
        chunk += line
    if chunk:
        yield chunk


class _SentenceFeed:
    """Pre-processed sentences for the trainer; keeps the first few for verification, and any error it met."""

    def __init__(
        self, texts: Iterable[str | os.PathLike], limit: int, word_chunks: Callable[[str], Iterable[str]] | None
    ) -> None:
        self.texts, self.limit, self.word_chunks = texts, limit, word_chunks
        self.sample: list[str] = []
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for item in self.texts:
                for document in _documents(item):
                    yield from self._sentences(document)
        except Exception as error:  # the trainer would only report it as a bare RuntimeError
            self.error = error
            raise

    def _sentences(self, document: str) -> Iterator[str]:
        # A delimiter (3 bytes) may follow each character (>= 1 byte): a quarter of the limit keeps it fitting.
        limit = self.limit if self.word_chunks is None else self.limit // 4
        for sentence in _chunks(preprocess(document), limit):
            if sentence:
                if len(self.sample) < _SAMPLE_SIZE:
                    self.sample.append(sentence)
                yield sentence if self.word_chunks is None else self._delimited(sentence)

    def _delimited(self, sentence: str) -> str:
        plain = sentence.replace(_WORD_DELIMITER, "")  # a delimiter in the text itself would be a cut
        chunks = list(self.word_chunks(plain))
        if "".join(chunks) != plain:
            raise ValueError(f"word_chunks must cut a sentence, not change it: {sentence[:80]!r} -> {chunks[:8]}")
        return _WORD_DELIMITER.join(chunks)


def _train(feed: _SentenceFeed, spec: dict[str, Any], seed: int) -> bytes:
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(feed), model_writer=buffer, **spec)
    except RuntimeError as error:
        if feed.error is not None:
            raise feed.error from None
        if not feed.sample:
            raise ValueError("train_sentencepiece got no text to train on") from None
        raise ValueError(
            f"SentencePiece training failed: {error} (hard_vocab_limit=False makes vocab_size a maximum)"
        ) from error
    return buffer.getvalue()


def _reorder(model: bytes, model_pb2: Any) -> bytes:
    """The model with its pieces in ChatGLM's id order (each piece's score and type kept)."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    by_name = {piece.piece: piece for piece in proto.pieces}
    head = [*META_PIECES, NEWLINE_PIECE] + ([SPACE_PIECE] if SPACE_PIECE in by_name else [])
    tail = [*CONTROL_PIECES, *whitespace_pieces(), *BYTE_PIECES]
    missing = [name for name in head + tail if name not in by_name]
    if missing:
        raise RuntimeError(f"the trained model lacks the pieces {missing}")
    fixed = set(head + tail)
    middle = [piece.piece for piece in proto.pieces if piece.piece not in fixed]
    pieces = []
    for name in head + middle + tail:
        piece = model_pb2.ModelProto.SentencePiece()
        piece.CopyFrom(by_name[name])
        pieces.append(piece)
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    return proto.SerializeToString()


def _verify_reorder(before: bytes, after: bytes, texts: list[str]) -> None:
    """Raise unless the reordered model loads, segments `texts` and a probe exactly as the trained one,
    and gives the probe back unchanged."""
    old = spm.SentencePieceProcessor(model_proto=before)
    new = spm.SentencePieceProcessor(model_proto=after)
    for text in [*texts, preprocess(_PROBE)]:
        if old.encode(text, out_type=str) != new.encode(text, out_type=str):
            raise RuntimeError(f"reordering the pieces changed the segmentation of {text[:80]!r}")
    if new.id_to_piece(new.get_piece_size() - 1) != BYTE_PIECES[-1] or new.piece_to_id(NEWLINE_PIECE) != 4:
        raise RuntimeError("the reordered model does not have ChatGLM's piece layout")
    probe = preprocess(_PROBE)
    if new.decode(new.encode(probe)) != probe:
        raise RuntimeError(
            f"the trained model does not give text back unchanged ({probe!r} decodes as "
            f"{new.decode(new.encode(probe))!r}); use model_type 'unigram' or 'bpe'"
        )
