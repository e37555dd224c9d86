"""The value-preserving GLM-4 BPE (glmkit/text/glm4_bpe.py): no token joins a space or quote to letters, two Chinese
characters or two digits, so a value has the same ids in a question and in a JSON call; the ranks file is a real
tiktoken file that GLM4Tokenizer and AutoTokenizer load, and tiktoken's merging reproduces the trainer's pieces."""

import json

import pytest

from glmkit.text.auto import AutoTokenizer
from glmkit.text.chat_template import GLM4_COMPACT_TOOLS_TEMPLATE
from glmkit.text.glm4_bpe import crossing_tokens, train_ranks, write_ranks
from glmkit.text.glm4_tokenizer import GLM4Tokenizer

CORPUS = [
    "What is the weather in Paris today?", "How is the weather in New York?", "Convert 12.5 km to miles.",
    'get_weather\n{"city": "Paris"}', 'get_weather\n{"city": "New York", "unit": "celsius"}',
    "北京今天天气怎么样？", '{"city": "北京"}', "上海现在几点？", '{"timezone": "上海"}', "计算 37 * 14 等于多少？",
    '{"expression": "37 * 14", "result": 518}', "It is 12°C and cloudy in Paris.", "巴黎现在多云，气温12°C。",
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> GLM4Tokenizer:
    root = tmp_path_factory.mktemp("glm4-bpe")
    ranks = train_ranks(CORPUS, 700)
    write_ranks(ranks, root / "tokenizer.model")
    GLM4Tokenizer(root / "tokenizer.model", chat_template=GLM4_COMPACT_TOOLS_TEMPLATE).save_pretrained(root)
    return GLM4Tokenizer.from_pretrained(root)


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def contains(ids, sub):
    return any(ids[i:i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


def test_the_ranks_are_bytes_then_merges_and_none_crosses_a_boundary(tokenizer):
    tokens = [tokenizer.id_to_bytes[i] for i in range(tokenizer.vocab_size)]
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(tokens) > 300  # it did learn merges
    assert crossing_tokens(tokens) == []
    assert b"Paris" in tokenizer.ranks and b" Paris" not in tokenizer.ranks and b'"Paris' not in tokenizer.ranks


@pytest.mark.parametrize("value", ["Paris", "New York", "北京", "上海", "37 * 14", "12.5", "Zürich", "Reykjavik"])
def test_a_value_has_the_same_ids_in_the_question_and_in_the_call(tokenizer, value):
    value_ids = ids_of(tokenizer, value)
    for question in (f"What is the weather in {value}?", f"{value}今天天气怎么样？", f"Weather: {value}", f"“{value}”"):
        assert contains(ids_of(tokenizer, question), value_ids), question
    call = ids_of(tokenizer, "get_weather\n" + json.dumps({"city": value}, ensure_ascii=False))
    assert contains(call, value_ids)


def test_chinese_is_one_token_per_character_and_digits_one_token_each(tokenizer):
    for text in ("北京今天天气怎么样", "上海现在几点"):
        assert [tokenizer.decode([i]) for i in ids_of(tokenizer, text)] == list(text)
    assert [tokenizer.decode([i]) for i in ids_of(tokenizer, "518 12345")] == list("518") + [" "] + list("12345")


@pytest.mark.parametrize("text", ["What's the weather in Zürich?\n", "北京今天天气怎么样？ 12.5 km", "emoji 🙂 and tabs\t\tend",
                                  '{"city": "São Paulo"}', "  leading spaces", "混合 text 和 123"])
def test_decode_encode_round_trips(tokenizer, text):
    assert tokenizer.decode(ids_of(tokenizer, text)) == text


def test_tiktoken_merging_gives_the_trainers_pieces(tokenizer):
    """Each token of an encoding is a whole piece of the training pattern: letters, one character, one digit."""
    for text in CORPUS[:13]:
        for i in ids_of(tokenizer, text):
            assert crossing_tokens([tokenizer.id_to_bytes[i]]) == []


def test_the_directory_loads_through_auto_tokenizer_with_its_template(tokenizer):
    loaded = AutoTokenizer.from_pretrained(tokenizer.vocab_file.parent)
    assert isinstance(loaded, GLM4Tokenizer) and loaded.chat_template == GLM4_COMPACT_TOOLS_TEMPLATE
    assert loaded.special_tokens["<|endoftext|>"] == tokenizer.vocab_size  # the specials follow the ranks
    assert ids_of(loaded, "北京 Paris") == ids_of(tokenizer, "北京 Paris")
