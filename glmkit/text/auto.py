"""`AutoTokenizer.from_pretrained(path)`: the tokenizer an official GLM repo ships, picked from its files.

Why from the files and not from a name: a directory may hold only a tokenizer, and glmkit never runs a repo's
remote code. What tells the families apart (spec 0, 3):
  * `ice_text.model` -> ChatGLM-6B (`ChatGLMTokenizer`);
  * `tokenizer.model` as tiktoken ranks text -> GLM-4 (`GLM4Tokenizer`); as a SentencePiece protobuf ->
    ChatGLM2 or ChatGLM3, which ship the *same* file: told apart by `glmkit_family` (written by glmkit), the repo
    name in tokenizer_config.json / config.json, or the remote code naming the role tokens; ChatGLM3 otherwise
    (its ids are ChatGLM2's plus four role tokens);
  * `tokenizer.json` (and no tiktoken file named by `ChatGLM4Tokenizer`) -> the fast loader (-hf, 0414).
`tokenizer_config.json`'s tokenizer_class / auto_map must agree with the file; when config.json is present its
vocabulary must hold every id the tokenizer can produce. Anything else is one error naming the files found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from glmkit.text.batching import read_json
from glmkit.text.chatglm3_tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmkit.text.fast_tokenizer import GLMFastTokenizer
from glmkit.text.glm4_tokenizer import GLM4Tokenizer
from glmkit.text.protocol import Tokenizer
from glmkit.text.tokenizer import ChatGLMTokenizer

_SP_FAMILIES = {"chatglm2": ChatGLM2Tokenizer, "chatglm3": ChatGLM3Tokenizer}


class TokenizerNotFoundError(ValueError):
    """A directory whose files are not (or not consistently) one of the GLM tokenizers."""


def _is_tiktoken(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(256)
    first = head.split(b"\n", 1)[0]
    parts = first.split(b" ")
    return len(parts) == 2 and parts[1].isdigit() and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                          b"0123456789+/=" for c in parts[0]) and bool(parts[0])


def _class_named(config: dict[str, Any]) -> str:
    """tokenizer_class, or the class auto_map points at (e.g. tokenization_chatglm.ChatGLM4Tokenizer)."""
    auto = (config.get("auto_map") or {}).get("AutoTokenizer")
    mapped = auto[0] if isinstance(auto, list) and auto and auto[0] else ""
    return str(config.get("tokenizer_class") or mapped.rsplit(".", 1)[-1] or "")


def sentencepiece_family(directory: Path, config: dict[str, Any]) -> str:
    """"chatglm2" or "chatglm3" for a directory with the SentencePiece `tokenizer.model` both ship."""
    if config.get("glmkit_family") in _SP_FAMILIES:
        return config["glmkit_family"]
    model_config = read_json(directory / "config.json")
    for name in (config.get("name_or_path"), config.get("_name_or_path"), model_config.get("_name_or_path")):
        text = str(name or "").lower()
        if "chatglm2" in text:
            return "chatglm2"
        if "chatglm3" in text:
            return "chatglm3"
    code = directory / "tokenization_chatglm.py"
    if code.is_file():  # read as text only, never run
        return "chatglm3" if "<|observation|>" in code.read_text(encoding="utf-8", errors="replace") else "chatglm2"
    return "chatglm3"


def _check_vocabulary(directory: Path, tokenizer: Tokenizer, files: str) -> None:
    model = read_json(directory / "config.json")
    rows = model.get("padded_vocab_size") or model.get("vocab_size")
    ids = len(tokenizer)  # type: ignore[arg-type]
    if rows is not None and ids > int(rows):
        raise TokenizerNotFoundError(
            f"{directory}: the tokenizer produces ids up to {ids - 1} but config.json's vocabulary has {rows} rows: "
            f"the tokenizer does not belong to this model (files: {files})"
        )


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path)` over glmkit's own tokenizers (no remote code, no transformers)."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **_: Any) -> Tokenizer:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory (pass the model or tokenizer directory)")
        names = sorted(p.name for p in directory.iterdir())
        files = ", ".join(names) or "nothing"
        config = read_json(directory / "tokenizer_config.json")
        wanted = _class_named(config)
        tokenizer = AutoTokenizer._pick(directory, config, wanted, files)
        _check_vocabulary(directory, tokenizer, files)
        return tokenizer

    @staticmethod
    def _pick(directory: Path, config: dict[str, Any], wanted: str, files: str) -> Tokenizer:
        model, fast = directory / "tokenizer.model", directory / "tokenizer.json"
        found = ""
        if (directory / "ice_text.model").is_file():
            if wanted in ("", "ChatGLMTokenizer"):
                return ChatGLMTokenizer.from_pretrained(directory)
            found = "ice_text.model is ChatGLM-6B's"
        elif model.is_file():
            tiktoken = _is_tiktoken(model)
            if tiktoken and wanted in ("", "ChatGLM4Tokenizer"):
                return GLM4Tokenizer.from_pretrained(directory)
            if not tiktoken and wanted in ("", "ChatGLMTokenizer"):
                return _SP_FAMILIES[sentencepiece_family(directory, config)].from_pretrained(directory)
            found = "tokenizer.model is " + ("GLM-4's tiktoken ranks file" if tiktoken else "a SentencePiece model")
        if fast.is_file() and wanted != "ChatGLMTokenizer":
            return GLMFastTokenizer.from_pretrained(directory)
        if found or wanted:
            raise TokenizerNotFoundError(
                f"{directory}: tokenizer_config.json names {wanted or 'no tokenizer_class'}, but "
                f"{found or 'no file of that tokenizer is there'} (files: {files})"
            )
        raise TokenizerNotFoundError(
            f"{directory} holds no GLM tokenizer: expected ice_text.model (ChatGLM-6B), tokenizer.model "
            f"(ChatGLM2/3 SentencePiece or GLM-4 tiktoken) or tokenizer.json (-hf, 0414); found: {files}"
        )
