"""The ChatGLM tokenizer and its trainer, checked against the spec's rules and the model's own piece table.

Expected ids come from piece lookups (`convert_tokens_to_ids`) and the spec (dummy prefix `▁`, longest-first
blanks, UTF-8 bytes, the released id layout), never from the encoder under test."""

import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from glmkit.models.positions import sequence_layout
from glmkit.text.tokenizer import ChatGLMTokenizer, postprocess, preprocess, train_sentencepiece

from samples import sample_corpus

CONTROLS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
BLANKS = [f"<|blank_{n}|>" for n in range(2, 81)]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
TAIL = CONTROLS + ["<|tab|>"] + BLANKS + BYTES
B80 = "<|blank_80|>"

ROUND_TRIP_TEXTS = [
    "你好，世界！Hello, world.",
    "  leading and trailing  ",
    " one leading space",
    "one trailing space ",
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(x)]  # 注释\n\n    return None\n",
    "数字 3.14159 和 1,000,000 以及 0x1F",
    "全角：，。！？；（）【】 and ASCII ,.!?;()[]",
    "emoji 👋🏽 mixed 龘 text\r\nwindows line",
    "\n\n\n",
    " " * 300 + "x",
    "",
]


def ids_of(tokenizer, *pieces):
    return [tokenizer.convert_tokens_to_ids(p) for p in pieces]


# ----- whitespace pre-processing


def test_newlines_and_tabs_map_to_their_pieces(tokenizer):
    newline, tab = ids_of(tokenizer, "<n>", "<|tab|>")
    text = "line one\nline two\n\n\tindented\t\tend"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(newline) == 3 and ids.count(tab) == 3
    assert tokenizer.tokenize("\n") == ["▁", "<n>"]
    assert tokenizer.tokenize("\t") == ["▁", "<|tab|>"]
    assert tokenizer.decode(ids) == text


def test_every_space_run_up_to_80_is_one_blank_piece(tokenizer):
    blank_ids = set(ids_of(tokenizer, *BLANKS))
    for n in range(2, 81):
        assert tokenizer.tokenize(" " * n) == ["▁", f"<|blank_{n}|>"]
        ids = tokenizer.encode("a" + " " * n + "b", add_special_tokens=False)
        assert [i for i in ids if i in blank_ids] == ids_of(tokenizer, f"<|blank_{n}|>")
        assert tokenizer.decode(ids) == "a" + " " * n + "b"


def test_preprocess_matches_the_official_replace_loop():
    def official(text):  # the spec's rule, spelled out: newline, tab, then runs of 80 down to 2 spaces
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(80, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(
            rng.choice([" " * rng.randint(1, 250), "\t", "\n", "x", "中"]) for _ in range(rng.randint(0, 12))
        )
        assert preprocess(text) == official(text)
        assert postprocess(preprocess(text)) == text


@pytest.mark.parametrize(
    ("n", "pieces"),
    [
        (1, ["▁"]),
        (81, [B80, "▁"]),
        (100, [B80, "<|blank_20|>"]),
        (160, [B80, B80]),
        (161, [B80, B80, "▁"]),
        (200, [B80, B80, "<|blank_40|>"]),
    ],
)
def test_long_space_runs_split_longest_first(tokenizer, n, pieces):
    ids = tokenizer.encode(" " * n, add_special_tokens=False)
    assert ids == ids_of(tokenizer, "▁", *pieces)  # the dummy prefix, then the run
    assert tokenizer.decode(ids) == " " * n


# ----- byte fallback


def test_emoji_falls_back_to_its_utf8_bytes(tokenizer):
    assert tokenizer.convert_tokens_to_ids("👋") == tokenizer.unk_token_id  # not a piece
    byte_pieces = ["<0xF0>", "<0x9F>", "<0x91>", "<0x8B>"]
    assert [f"<0x{b:02X}>" for b in "👋".encode()] == byte_pieces
    ids = tokenizer.encode("👋", add_special_tokens=False)
    assert ids == ids_of(tokenizer, "▁", *byte_pieces)
    first_byte = tokenizer.vocab_size - 256  # the bytes close the vocabulary, as in the release
    assert ids[1:] == [first_byte + 0xF0, first_byte + 0x9F, first_byte + 0x91, first_byte + 0x8B]
    assert tokenizer.decode(ids) == "👋"


def test_rare_cjk_character_round_trips_through_bytes(tokenizer):
    assert "龘" not in "".join(sample_corpus())
    ids = tokenizer.encode("龘", add_special_tokens=False)
    assert ids == ids_of(tokenizer, "▁", "<0xE9>", "<0xBE>", "<0x98>")
    assert tokenizer.decode(ids) == "龘"
    assert tokenizer.decode(tokenizer.encode("龘龘 and 龘")) == "龘龘 and 龘"


# ----- special tokens


def test_special_ids_come_from_the_piece_table(tokenizer):
    pad, unk, sop, eop, mask, gmask, smask = ids_of(
        tokenizer, "<pad>", "<unk>", "<sop>", "<eop>", "[MASK]", "[gMASK]", "[sMASK]"
    )
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (pad, unk) == (3, 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (sop, eop)
    assert (tokenizer.mask_token_id, tokenizer.gmask_token_id, tokenizer.smask_token_id) == (mask, gmask, smask)
    special = tokenizer.special_ids
    assert (special.bos, special.mask, special.gmask, special.pad) == (sop, mask, gmask, pad)


def test_encode_appends_gmask_and_sop(tokenizer):
    ids = tokenizer.encode("你好")
    assert ids[-2:] == ids_of(tokenizer, "[gMASK]", "<sop>")
    assert ids[:-2] == tokenizer.encode("你好", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("▁")  # the dummy prefix, id 5 as in the spec's "你好"


@pytest.mark.parametrize("text", ["[gMASK]", "<sop>", "a [MASK] b <eop> [sMASK] c", "<s></s><pad><unused_0>"])
def test_typed_special_tokens_stay_plain_text(tokenizer, text):
    forbidden = set(ids_of(tokenizer, *CONTROLS, "<s>", "</s>", "<pad>"))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not forbidden & set(ids)
    assert tokenizer.decode(ids) == text


def test_control_ids_decode_to_nothing(tokenizer):
    assert tokenizer.decode(ids_of(tokenizer, *CONTROLS)) == ""
    assert tokenizer.decode(tokenizer.encode("你好")) == "你好"
    text_ids = tokenizer.encode("a b", add_special_tokens=False)
    assert tokenizer.decode(text_ids + ids_of(tokenizer, "<eop>", "[MASK]")) == "a b"


def test_pair_layout(tokenizer):
    a = tokenizer.encode("问题 question", add_special_tokens=False)
    b = tokenizer.encode("答案 answer", add_special_tokens=False)
    expected = a + ids_of(tokenizer, "[gMASK]", "<sop>") + b + ids_of(tokenizer, "<eop>")
    assert tokenizer.build_inputs_with_special_tokens(a, b) == expected
    assert tokenizer("问题 question", text_pair="答案 answer")["input_ids"] == expected
    assert tokenizer(["问题 question"], text_pair=["答案 answer"])["input_ids"] == [expected]


def test_piece_layout_matches_the_release(tokenizer, tokenizer_dir):
    vocab = tokenizer.vocab_size
    assert tokenizer.convert_ids_to_tokens(list(range(6))) == ["<unk>", "<s>", "</s>", "<pad>", "<n>", "▁"]
    assert tokenizer.convert_ids_to_tokens(list(range(vocab - len(TAIL), vocab))) == TAIL
    middle = set(tokenizer.convert_ids_to_tokens(list(range(6, vocab - len(TAIL)))))
    assert not middle & set(TAIL)
    # Offsets from [MASK] as in the released vocabulary (130000 [MASK], 130008 tab, 130009 blank_2, 130088 <0x00>).
    mask = tokenizer.mask_token_id
    assert [tokenizer.convert_tokens_to_ids(p) - mask for p in ["<|tab|>", "<|blank_2|>", "<|blank_4|>", "<0x00>"]] == [
        8,
        9,
        11,
        88,
    ]
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tokenizer_dir / "ice_text.model").read_bytes())
    kinds = {p.piece: p.type for p in proto.pieces}
    piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    assert kinds["<unk>"] == piece.UNKNOWN
    assert all(kinds[p] == piece.CONTROL for p in CONTROLS + ["<s>", "</s>", "<pad>"])
    assert all(kinds[p] == piece.USER_DEFINED for p in ["<n>", "<|tab|>", *BLANKS])
    assert all(kinds[p] == piece.BYTE for p in BYTES)
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.remove_extra_whitespaces


# ----- round trips


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_accepts_ints_tensors_and_drops_pads_and_out_of_vocabulary_ids(tokenizer):
    ids = tokenizer.encode("hello 世界")
    assert tokenizer.decode(torch.tensor(ids)) == "hello 世界"
    assert tokenizer.decode([tokenizer.pad_token_id] * 3 + ids + [tokenizer.vocab_size + 5]) == "hello 世界"
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids("<n>")) == "\n"
    assert tokenizer.batch_decode(torch.tensor([ids, ids])) == ["hello 世界"] * 2
    with pytest.raises(ValueError, match="batch_decode"):
        tokenizer.decode(torch.tensor([ids, ids]))


# ----- image-token offset


def test_num_image_tokens_shift_every_id(tokenizer, tokenizer_dir):
    shifted = ChatGLMTokenizer(tokenizer_dir / "ice_text.model", num_image_tokens=20000)
    for text in ROUND_TRIP_TEXTS[:5]:
        assert shifted.encode(text) == [i + 20000 for i in tokenizer.encode(text)]
    assert shifted.vocab_size == tokenizer.vocab_size + 20000
    assert shifted.pad_token_id == 20003  # the first release's pad id (spec)
    for name in ["unk", "bos", "eos", "mask", "gmask", "smask"]:
        assert getattr(shifted, f"{name}_token_id") == getattr(tokenizer, f"{name}_token_id") + 20000
    assert shifted.special_ids.gmask == tokenizer.gmask_token_id + 20000
    ids = shifted.encode("你好 world")
    assert shifted.decode([0, 5, 19999] + ids) == "你好 world"  # ids below 20000 are image tokens: dropped
    assert shifted.convert_ids_to_tokens(7) == "<image_7>" and shifted.convert_tokens_to_ids("<image_7>") == 7


def test_from_pretrained_infers_image_tokens_from_model_config(tokenizer, tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "ice_text.model", tmp_path / "ice_text.model")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_token_id + 20000}))
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == 20000 and loaded.bos_token_id == tokenizer.bos_token_id + 20000
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    assert ChatGLMTokenizer.from_pretrained(tmp_path).num_image_tokens == 0  # the tokenizer's own config wins
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_token_id - 1}))
    with pytest.raises(ValueError, match="bos_token_id"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


# ----- batches and padding


def test_padding_left_pads_and_hides_pads(tokenizer):
    long_ids, short = tokenizer.encode("a longer text here"), tokenizer.encode("hi")
    length, n = len(long_ids), len(short)
    n_pad = length - n
    assert n_pad > 0
    enc = tokenizer(["a longer text here", "hi"], padding=True, return_tensors="pt")
    assert enc["input_ids"].shape == (2, length)
    assert enc["attention_mask"].shape == (2, 1, length, length) and enc["attention_mask"].dtype == torch.bool
    assert enc["position_ids"].shape == (2, 2, length)
    assert enc["input_ids"][0].tolist() == long_ids
    assert enc["input_ids"][1].tolist() == [tokenizer.pad_token_id] * n_pad + short
    mask, positions = enc["attention_mask"][1, 0], enc["position_ids"][1]
    assert mask[:n_pad, :].all() and mask[:, :n_pad].all()
    assert (positions[:, :n_pad] == 0).all()
    # The real part is the unpadded layout of the row alone...
    alone_positions, alone_mask = sequence_layout(short, tokenizer.special_ids, prefer_gmask=False)
    assert torch.equal(positions[:, n_pad:], alone_positions)
    assert torch.equal(mask[n_pad:, n_pad:], alone_mask)
    # ...which for "... [gMASK] <sop>" is, by the spec's rule:
    assert positions[0, n_pad:].tolist() == list(range(n - 1)) + [n - 2]
    assert positions[1, n_pad:].tolist() == [0] * (n - 1) + [1]
    expected_mask = torch.zeros(n, n, dtype=torch.bool)
    expected_mask[: n - 1, n - 1] = True  # the context does not see <sop>; <sop> sees everything
    assert torch.equal(mask[n_pad:, n_pad:], expected_mask)
    assert enc["position_ids"][0, 0].tolist() == list(range(length - 1)) + [length - 2]


def test_padding_without_tensors_gives_the_same_lists(tokenizer):
    texts = ["a longer text here", "hi"]
    tensors = tokenizer(texts, padding="longest", return_tensors="pt")
    lists = tokenizer(texts, padding=True)
    assert set(lists) == {"input_ids", "attention_mask", "position_ids"}
    assert all(lists[key] == tensors[key].tolist() for key in lists)
    single = tokenizer("hi", padding=True)
    assert single["input_ids"] == tokenizer.encode("hi") and len(single["position_ids"]) == 2


def test_without_padding_only_input_ids(tokenizer):
    enc = tokenizer(["a", "bb cc dd"])
    assert set(enc) == {"input_ids"}
    assert enc["input_ids"] == [tokenizer.encode("a"), tokenizer.encode("bb cc dd")]
    assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi")
    assert tokenizer("hi", return_tensors="pt")["input_ids"].tolist() == [tokenizer.encode("hi")]
    with pytest.raises(ValueError, match="padding=True"):
        tokenizer(["a", "bb cc dd"], return_tensors="pt")


def test_max_length_padding(tokenizer):
    ids = tokenizer.encode("hello there")
    enc = tokenizer(["hello there"], padding="max_length", max_length=len(ids) + 3, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [tokenizer.pad_token_id] * 3 + ids
    with pytest.raises(ValueError, match=rf"{len(ids)}.*max_length={len(ids) - 1}"):
        tokenizer(["hello there"], padding="max_length", max_length=len(ids) - 1)


def test_mask_token_takes_the_mask_position_in_the_tokenizer_path(tokenizer):
    mask_id = tokenizer.mask_token_id
    ids = (
        tokenizer.encode("abc", add_special_tokens=False)
        + [mask_id]
        + tokenizer.encode("def", add_special_tokens=False)
    )
    seq = tokenizer.build_inputs_with_special_tokens(ids)
    other = tokenizer.encode("a much longer sentence that makes the first one padded")
    enc = tokenizer.pad([seq, other], return_tensors="pt")
    n_pad = len(other) - len(seq)
    ctx, mask_at = seq.index(tokenizer.bos_token_id), seq.index(mask_id)
    assert seq.index(tokenizer.gmask_token_id) != mask_at
    assert enc["position_ids"][0, 0, n_pad:].tolist() == list(range(ctx)) + [mask_at] * (len(seq) - ctx)


def test_batch_encoding_moves_tensors(tokenizer):
    enc = tokenizer(["a", "bb"], padding=True, return_tensors="pt")
    assert enc.to("meta") is enc
    assert all(value.device.type == "meta" for value in enc.values())
    assert enc.input_ids is enc["input_ids"]


# ----- loading, saving and errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ChatGLMTokenizer.from_pretrained(tmp_path / "nowhere")


def test_directory_without_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_corrupt_model_file(tmp_path):
    (tmp_path / "ice_text.model").write_bytes(b"\x00\x01 this is not a sentencepiece model \xff" * 10)
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_model_without_chatglm_pieces(tmp_path):
    model = tmp_path / "ice_text.model"
    with open(model, "wb") as writer:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample_corpus()), model_writer=writer, vocab_size=300, minloglevel=2
        )
    with pytest.raises(ValueError, match=r"lacks the ChatGLM special pieces .*<n>.*\[gMASK\].*<sop>"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert config == {
        "bos_token": "<sop>",
        "eos_token": "<eop>",
        "eop_token": "<eop>",
        "gmask_token": "[gMASK]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "remove_space": False,
        "do_lower_case": False,
        "num_image_tokens": 0,
        "tokenizer_class": "ChatGLMTokenizer",
    }
    loaded = ChatGLMTokenizer.from_pretrained(tmp_path / "copy")
    assert all(loaded.encode(t) == tokenizer.encode(t) for t in ROUND_TRIP_TEXTS)


# ----- training


def test_training_writes_only_the_two_files(tokenizer_dir):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == ["ice_text.model", "tokenizer_config.json"]


def test_training_is_exact_in_size_and_reproducible(tmp_path):
    first = train_sentencepiece(sample_corpus(), tmp_path / "a", vocab_size=900, seed=1, num_threads=2)
    second = train_sentencepiece(sample_corpus(), tmp_path / "b", vocab_size=900, seed=1, num_threads=2)
    assert (first / "ice_text.model").read_bytes() == (second / "ice_text.model").read_bytes()
    assert ChatGLMTokenizer.from_pretrained(first).vocab_size == 900


def test_training_from_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(line.replace("\n", " ") for line in sample_corpus()), encoding="utf-8")
    out = train_sentencepiece([corpus], tmp_path / "tok", vocab_size=900, hard_vocab_limit=False)
    loaded = ChatGLMTokenizer.from_pretrained(out)
    text = "for i in range(10):\n\tprint(i)  # 结果"
    assert loaded.decode(loaded.encode(text)) == text


def test_training_rejects_layout_options_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="byte_fallback"):
        train_sentencepiece(sample_corpus(), tmp_path, vocab_size=500, byte_fallback=False)
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", ""], tmp_path, vocab_size=500)
    with pytest.raises(TypeError, match="os.PathLike"):
        train_sentencepiece(["text", 42], tmp_path, vocab_size=500)


def test_training_without_protobuf_says_what_to_install(tmp_path, monkeypatch):
    import sentencepiece

    monkeypatch.delattr(sentencepiece, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    with pytest.raises(ImportError, match="pip install protobuf"):
        train_sentencepiece(sample_corpus(), tmp_path, vocab_size=500)


def _capital_lines() -> list[str]:
    rng = random.Random(0)
    names = ["".join(rng.choice("甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉") for _ in range(2)) for _ in range(60)]
    return [f"{rng.choice(names)}的首都是{rng.choice(names)}。" for _ in range(3000)] + sample_corpus()


def test_word_chunks_keep_learned_pieces_inside_words(tmp_path):
    template = set("的首都是。")

    def fused(out: Path) -> list[str]:
        sp = ChatGLMTokenizer.from_pretrained(out).sp
        pieces = [sp.id_to_piece(i).lstrip("▁") for i in range(sp.get_piece_size())]
        return [p for p in pieces if set(p) & template and set(p) - template and p != "首都"]

    # Without cuts the repeated template fuses with the names around it: the case this option exists for.
    plain = train_sentencepiece(_capital_lines(), tmp_path / "plain", vocab_size=900, hard_vocab_limit=False)
    assert fused(plain)

    def words(sentence: str) -> list[str]:
        return [chunk for chunk in re.split("(的|首都|是|。)", sentence) if chunk]

    cut = train_sentencepiece(_capital_lines(), tmp_path / "cut", vocab_size=900, hard_vocab_limit=False,
                              word_chunks=words)
    assert not fused(cut)
    tokenizer = ChatGLMTokenizer.from_pretrained(cut)
    text = "甲乙的首都是丙丁。 the model reads"
    assert tokenizer.decode(tokenizer.encode(text)) == text

    with pytest.raises(ValueError, match="word_chunks must cut"):
        train_sentencepiece(["甲乙的首都"] * 50, tmp_path / "bad", vocab_size=500, hard_vocab_limit=False,
                            word_chunks=lambda s: [s.upper(), "x"])
