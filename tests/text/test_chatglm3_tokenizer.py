"""ChatGLM2/3 tokenizers on a SentencePiece model trained in the released layout (spec 3.1, 3.2, pitfalls 16-17).

Expected ids come from the SentencePiece model's own piece table and the spec's structural rules (specials after
the pieces, `[gMASK] sop` prefix, one SentencePiece call per message part), never from the encoder under test."""

import json

import pytest
import torch

from glmkit.text.auto import AutoTokenizer
from glmkit.text.chatglm3_tokenizer import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS, ChatGLM2Tokenizer, ChatGLM3Tokenizer


@pytest.fixture(scope="module")
def glm2(chatglm2_dir):
    return ChatGLM2Tokenizer.from_pretrained(chatglm2_dir)


@pytest.fixture(scope="module")
def glm3(chatglm3_dir):
    return ChatGLM3Tokenizer.from_pretrained(chatglm3_dir)


def sp_ids(tok, text):
    """One SentencePiece call, as the official SPTokenizer.encode."""
    return tok.sp.encode(text)


def test_meta_and_byte_pieces_sit_where_the_released_file_has_them(glm3):
    sp = glm3.sp
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(13) == "<0x0A>" and sp.id_to_piece(258) == "<0xFF>"
    assert glm3.eos_token_id == 2 and glm3.pad_token_id == 0


@pytest.mark.parametrize("cls, specials", [(ChatGLM2Tokenizer, CHATGLM2_SPECIALS), (ChatGLM3Tokenizer, CHATGLM3_SPECIALS)])
def test_specials_follow_the_pieces_in_the_official_order(chatglm3_dir, cls, specials):
    tok = cls.from_pretrained(chatglm3_dir)
    n = tok.sp.get_piece_size()
    assert [tok.convert_tokens_to_ids(s) for s in specials] == list(range(n, n + len(specials)))
    assert tok.vocab_size == len(tok) == n + len(specials)  # 64794 / 64798 with the real 64789 pieces
    assert "sop" in specials and "<sop>" not in specials  # no angle brackets (pitfall 2)
    assert tok.special_ids.bos == tok.convert_tokens_to_ids("sop") and tok.special_ids.gmask == n + 1


def test_encode_prefixes_gmask_sop_and_add_special_tokens_false_gives_bare_pieces(glm3):
    prefix = [glm3.get_command("[gMASK]"), glm3.get_command("sop")]
    assert glm3.encode("你好") == prefix + sp_ids(glm3, "你好")
    assert glm3.encode("你好", add_special_tokens=False) == sp_ids(glm3, "你好")
    assert glm3.convert_ids_to_tokens(glm3.encode("你好")[2]).startswith("\u2581")  # the dummy prefix
    assert glm3.build_inputs_with_special_tokens([7], [8]) == [*prefix, 7, 8, glm3.eos_token_id]


def test_round_prompt_keeps_newlines_as_byte_pieces(glm2):
    ids = glm2.encode("[Round 1]\n\n问：你好\n\n答：")
    newline = glm2.convert_tokens_to_ids("<0x0A>")
    assert newline == 13 and ids[:2] == glm2.prefix_ids
    at = [i for i, x in enumerate(ids) if x == newline]
    assert len(at) == 4 and at[1] == at[0] + 1 and at[3] == at[2] + 1  # "\n\n" twice, no whitespace folding
    assert ids[2:] == sp_ids(glm2, "[Round 1]\n\n问：你好\n\n答：")


def test_special_strings_in_text_stay_text_unless_encode_special_tokens(glm3):
    user, gmask = glm3.get_command("<|user|>"), glm3.get_command("[gMASK]")
    assert user not in glm3.encode("<|user|>\nhi", add_special_tokens=False)
    split = glm3.encode("<|user|>\nhi[gMASK]", add_special_tokens=False, encode_special_tokens=True)
    assert split[0] == user and gmask not in split  # only the four role tokens are split out
    assert split[1:] == sp_ids(glm3, "\nhi[gMASK]")  # each chunk is its own SentencePiece call


def test_build_chat_input_builds_each_message_part_with_its_own_dummy_prefix(glm3):
    batch = glm3.build_chat_input("你好")
    user, assistant = glm3.get_command("<|user|>"), glm3.get_command("<|assistant|>")
    expected = [*glm3.prefix_ids, user, *sp_ids(glm3, "\n"), *sp_ids(glm3, "你好"), assistant]
    assert sp_ids(glm3, "\n") == [glm3.convert_tokens_to_ids("\u2581"), 13]  # [30910, 13] in the real file
    assert batch["input_ids"].tolist() == [expected]
    assert batch["position_ids"].tolist() == [list(range(len(expected)))]
    assert batch["attention_mask"].tolist() == [[1] * len(expected)]
    assert expected != [*glm3.prefix_ids, user, *sp_ids(glm3, "\n你好"), assistant]  # one call would differ


def test_build_chat_input_history_metadata_tools_and_role(glm3):
    tools = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}]
    history = [{"role": "system", "content": "S", "tools": tools},
               {"role": "assistant", "metadata": "get_weather", "content": "code"}]
    ids = glm3.build_chat_input('{"t": 1}', history, role="observation")["input_ids"][0].tolist()
    content = "S\n" + json.dumps(tools, indent=4, ensure_ascii=False)
    expected = [*glm3.prefix_ids,
                glm3.get_command("<|system|>"), *sp_ids(glm3, "\n"), *sp_ids(glm3, content),
                glm3.get_command("<|assistant|>"), *sp_ids(glm3, "get_weather\n"), *sp_ids(glm3, "code"),
                glm3.get_command("<|observation|>"), *sp_ids(glm3, "\n"), *sp_ids(glm3, '{"t": 1}'),
                glm3.get_command("<|assistant|>")]
    assert ids == expected
    with pytest.raises(ValueError, match="unknown role"):
        glm3.build_single_message("tool", "", "x")


def test_decode_rules_differ_between_chatglm2_and_chatglm3(glm2, glm3):
    ids = glm3.build_chat_input("你好")["input_ids"][0].tolist()
    assert glm3.decode(ids) == "[gMASK]sop<|user|> \n 你好<|assistant|>"  # literal specials, "▁" as a space
    assert glm3.decode(ids, skip_special_tokens=True) == "\n 你好"
    text_ids = glm2.encode("你好 world")
    assert glm2.decode(text_ids + [glm2.eos_token_id, 0, 1]) == "你好 world"  # specials, eos, pad, bos: nothing
    assert glm2.decode([*text_ids, glm2.vocab_size + 3, 65023]) == "你好 world"  # padding rows: nothing
    assert glm3.decode(torch.tensor(text_ids[2:])) == "你好 world"


@pytest.mark.parametrize("text", ["  a  b\n\tc ", "def f(x):\n    return x  # 注释\n", "\n\n", "emoji 👋 龘", ""])
def test_whitespace_and_unseen_characters_round_trip(glm3, text):
    assert glm3.decode(glm3.encode(text, add_special_tokens=False)) == text


def test_call_left_pads_with_positions_from_zero(glm3):
    batch = glm3(["你好", "a"], padding=True, return_tensors="pt")
    short = glm3.encode("a")
    pads = batch["input_ids"].shape[1] - len(short)
    assert batch["input_ids"][1].tolist() == [0] * pads + short
    assert batch["attention_mask"][1].tolist() == [0] * pads + [1] * len(short)
    assert batch["position_ids"][1].tolist() == [0] * pads + list(range(len(short)))
    assert glm3("你好")["input_ids"] == glm3.encode("你好")


@pytest.mark.parametrize("cls", [ChatGLM2Tokenizer, ChatGLM3Tokenizer])
def test_save_and_reload_keep_ids_and_family(tmp_path, chatglm3_dir, cls):
    tok = cls.from_pretrained(chatglm3_dir)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is cls
    text = "[Round 1]\n\n问：你好 world\n\n答："
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ChatGLMTokenizer" and config["padding_side"] == "left"
