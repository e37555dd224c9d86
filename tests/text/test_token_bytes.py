"""Each tokenizer's `token_bytes`: the bytes a grammar sees for each id must be the text its decode gives.

A constrained reply is only valid if what the grammar matched (the ids' bytes, joined) is what the server sends
back (the tokenizer's decode of those ids). So random runs of ids are decoded both ways and compared, for every
tokenizer family; SentencePiece's decode drops the first piece's leading space (its dummy prefix), nothing else.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from glmkit.text.chatglm3_tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmkit.text.fast_tokenizer import GLMFastTokenizer
from glmkit.text.glm4_tokenizer import GLM4Tokenizer
from glmkit.text.tokenizer import ChatGLMTokenizer

DEMO = Path(__file__).resolve().parents[2] / "glmkit" / "assets" / "demo-model"


@pytest.fixture(params=["demo", "chatglm-6b", "chatglm2", "chatglm3", "glm4", "glm4-hf"])
def any_tokenizer(request, tokenizer_dir, chatglm2_dir, chatglm3_dir, glm4_dir, glm4_hf_dir):
    return {"demo": lambda: ChatGLMTokenizer.from_pretrained(DEMO),
            "chatglm-6b": lambda: ChatGLMTokenizer.from_pretrained(tokenizer_dir),
            "chatglm2": lambda: ChatGLM2Tokenizer.from_pretrained(chatglm2_dir),
            "chatglm3": lambda: ChatGLM3Tokenizer.from_pretrained(chatglm3_dir),
            "glm4": lambda: GLM4Tokenizer.from_pretrained(glm4_dir),
            "glm4-hf": lambda: GLMFastTokenizer.from_pretrained(glm4_hf_dir)}[request.param]()


def test_joined_token_bytes_are_the_decoded_text(any_tokenizer):
    table = any_tokenizer.token_bytes()
    assert len(table) == len(any_tokenizer)
    text_ids = [i for i, b in enumerate(table) if b is not None]
    assert len(text_ids) > 0.9 * len(table)
    rng = random.Random(0)
    compared = 0
    for _ in range(3000):
        ids = [rng.choice(text_ids) for _ in range(rng.randint(1, 8))]
        try:
            expected = b"".join(table[i] for i in ids).decode("utf-8")
        except UnicodeDecodeError:  # split characters decode to U+FFFD either way; nothing to compare
            continue
        decoded = any_tokenizer.decode(ids)
        assert decoded in (expected, expected[1:] if expected.startswith(" ") else expected), (ids, expected)
        compared += 1
    assert compared > 1000


def test_specials_and_control_pieces_have_no_bytes(any_tokenizer):
    table = any_tokenizer.token_bytes()
    assert table[any_tokenizer.eos_token_id] is None
    for special in any_tokenizer.special_ids.bos, any_tokenizer.special_ids.gmask:
        assert table[special] is None


def test_chatglm6b_whitespace_pieces_are_their_whitespace_and_lone_angle_brackets_are_left_out():
    tokenizer = ChatGLMTokenizer.from_pretrained(DEMO)
    table = tokenizer.token_bytes()
    assert table[tokenizer.convert_tokens_to_ids("<n>")] == b"\n"
    assert table[tokenizer.convert_tokens_to_ids("<|tab|>")] == b"\t"
    assert table[tokenizer.convert_tokens_to_ids("<|blank_7|>")] == b" " * 7
    # "<" then "n>" decodes to a newline, so no piece that can start such a name has bytes a grammar may use
    pieces = tokenizer.convert_tokens_to_ids(["<0x3C>", "<0x6E>", "<0x3E>"])  # "<", "n", ">" as byte pieces
    assert tokenizer.decode(pieces) == "\n"
    assert not any(b is not None and b"<" in b for b in table)
