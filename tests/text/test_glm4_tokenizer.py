"""GLM-4's tiktoken tokenizer, the fast (-hf / 0414) loader and the chat template (spec 3.3, 3.4, 4.4, pitfalls 18-22).

The ranks file and tokenizer.json are the same byte-level BPE trained in the test set-up; expected ids come from
the BPE itself (`encode_ordinary`), the specials table and the spec's rendered examples."""

import json

import pytest
import regex

from glmkit.text.chat_template import ChatTemplateError, render_template
from glmkit.text.fast_tokenizer import GLMFastTokenizer
from glmkit.text.glm4_tokenizer import GLM4_PATTERN, GLM4_SPECIALS, GLM4Tokenizer

from samples import corpus_lines

PERSONA = "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求提供适当的答复和支持。"
GET_TIME = {"type": "function", "function": {"name": "get_time", "description": "当前时间",
                                             "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def glm4(glm4_dir):
    return GLM4Tokenizer.from_pretrained(glm4_dir)


@pytest.fixture(scope="module")
def fast(glm4_hf_dir):
    return GLMFastTokenizer.from_pretrained(glm4_hf_dir)


def bpe(tok, text):
    return tok.encoding.encode_ordinary(text)


def test_specials_follow_the_ranks_in_glm4_order(glm4):
    n = len(glm4.ranks)
    assert [glm4.convert_tokens_to_ids(s) for s in GLM4_SPECIALS] == list(range(n, n + 14))
    assert glm4.vocab_size == n and len(glm4) == n + 14  # 151329 and 151343 in the real vocabulary
    assert glm4.eos_token_id == glm4.pad_token_id == n  # <|endoftext|>
    assert glm4.special_ids.bos == n + 4 and glm4.special_ids.gmask == n + 2  # <sop>, [gMASK]


def test_every_byte_is_a_token_and_newline_is_198(glm4):
    assert all(glm4.convert_tokens_to_ids(bytes([b])) < 256 for b in range(256))
    assert glm4.encode("\n", add_special_tokens=False) == [198]  # as in the real (cl100k-like) vocabulary


def test_encode_prefixes_gmask_sop_and_matches_special_strings_in_text(glm4):
    gmask, sop, user, assistant = (glm4.get_command(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>"))
    assert glm4.encode("你好") == [gmask, sop, *bpe(glm4, "你好")]
    assert glm4.encode("<|user|>\n你好<|assistant|>", add_special_tokens=False) == [user, 198, *bpe(glm4, "你好"), assistant]


def test_no_token_crosses_a_pretokenizer_chunk(glm4):
    text = "a  \n\n  b's 12345 I'LL 你好，world!!\r\n"
    chunks = regex.findall(GLM4_PATTERN, text)
    assert chunks[:3] == ["a", "  \n\n", " "] and "123" in chunks and "45" in chunks and "'LL" in chunks
    assert glm4.encode(text, add_special_tokens=False) == [i for c in chunks for i in bpe(glm4, c)]


def test_the_tiktoken_and_the_fast_tokenizer_agree(glm4, fast):
    for line in [*corpus_lines()[:400], "你好 world\n\n  x", "<|user|>\nhi<|observation|>", "\t\tdef f():\r\n"]:
        assert glm4.encode(line, add_special_tokens=False) == fast.encode(line, add_special_tokens=False), line
    assert fast.special_ids == glm4.special_ids and fast.eos_token_id == glm4.eos_token_id
    assert len(fast) == len(glm4) and fast.vocab_size == glm4.vocab_size


def test_decode_puts_spaces_around_specials_unless_told_not_to(glm4):
    ids = glm4.encode("<|user|>\n你好<|assistant|>")
    assert glm4.decode(ids) == "[gMASK] <sop> <|user|> \n你好 <|assistant|>"
    assert glm4.decode(ids, spaces_between_special_tokens=False) == "[gMASK]<sop><|user|>\n你好<|assistant|>"
    assert glm4.decode(ids, skip_special_tokens=True) == "\n你好"
    assert glm4.decode([*bpe(glm4, "ok"), len(glm4) + 5]) == "ok"  # an embedding padding row has no token


def test_decode_replaces_a_split_character(glm4):
    raw = "龘".encode()
    ids = [glm4.convert_tokens_to_ids(raw[:1])]
    assert glm4.decode(ids) == "\ufffd"


def test_chat_template_renders_the_spec_examples(glm4):
    hi = [{"role": "user", "content": "Hi"}]
    assert glm4.apply_chat_template(hi, tokenize=False) == "[gMASK]<sop><|user|>\nHi<|assistant|>"
    assert glm4.apply_chat_template(hi, tokenize=False, add_generation_prompt=False) == "[gMASK]<sop><|user|>\nHi"
    brief = [{"role": "system", "content": "Be brief."}, *hi]
    assert glm4.apply_chat_template(brief, tokenize=False) == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>"
    messages = [{"role": "system", "content": "Be brief.", "tools": [GET_TIME]}, {"role": "user", "content": "几点了？"},
                {"role": "assistant", "metadata": "get_time", "content": '{"tz": "UTC+8"}'},
                {"role": "observation", "content": '{"time": "10:00"}'}]
    schema = json.dumps(GET_TIME["function"], indent=4, ensure_ascii=False)
    assert glm4.apply_chat_template(messages, tokenize=False) == (
        f"[gMASK]<sop><|system|>\n{PERSONA}\n\n# 可用工具\n## get_time\n\n{schema}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        "<|system|>\nBe brief.<|user|>\n几点了？<|assistant|>get_time\n{\"tz\": \"UTC+8\"}<|observation|>\n"
        "{\"time\": \"10:00\"}<|assistant|>")


def test_template_details_tools_message_without_content_role_names_and_global_tools(glm4):
    only_tools = glm4.apply_chat_template([{"role": "system", "content": None, "tools": [{"type": "python"}]}],
                                          tokenize=False, add_generation_prompt=False)
    assert only_tools.startswith("[gMASK]<sop><|system|>\n" + PERSONA + "\n\n# 可用工具\n## python\n\n当你向 `python`")
    assert only_tools.count("<|system|>") == 1  # no second system turn for content None
    assert "<|tool|>" in glm4.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)  # pitfall 19
    ignored = glm4.apply_chat_template([{"role": "user", "content": "Hi"}], tools=[GET_TIME], tokenize=False)
    assert ignored == "[gMASK]<sop><|user|>\nHi<|assistant|>"  # glm-4-9b-chat reads only item["tools"]


def test_apply_chat_template_ids_and_dict(glm4):
    ids = glm4.apply_chat_template([{"role": "user", "content": "你好"}])
    assert ids == [*glm4.prefix_ids, glm4.get_command("<|user|>"), 198, *bpe(glm4, "你好"), glm4.get_command("<|assistant|>")]
    batch = glm4.apply_chat_template([{"role": "user", "content": "你好"}], return_dict=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [ids] and batch["position_ids"].tolist() == [list(range(len(ids)))]


def test_the_repos_own_template_wins_and_is_sandboxed(tmp_path, glm4):
    glm4.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}<|assistant|>\n<think>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    own = GLM4Tokenizer.from_pretrained(tmp_path)
    assert own.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).endswith("<|assistant|>\n<think>")
    with pytest.raises(ChatTemplateError, match="no"):
        render_template("{{ raise_exception('no') }}", [])
    with pytest.raises(ChatTemplateError):
        render_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_template("{% for %}", [])
    assert render_template("{{ x | tojson }}", [], x={"b": "中", "a": 1}) == '{"b": "中", "a": 1}'  # order, UTF-8


def test_left_padding_uses_endoftext_and_positions_from_zero(glm4):
    batch = glm4(["你好 world", "a"], padding=True)
    pads = len(batch["input_ids"][0]) - len(glm4.encode("a"))
    assert batch["input_ids"][1][:pads] == [glm4.pad_token_id] * pads
    assert batch["position_ids"][1] == [0] * pads + list(range(len(glm4.encode("a"))))


def test_save_and_reload_round_trip(tmp_path, glm4, fast):
    glm4.save_pretrained(tmp_path / "slow")
    again = GLM4Tokenizer.from_pretrained(tmp_path / "slow")
    assert again.ranks == glm4.ranks and again.special_tokens == glm4.special_tokens
    assert again.chat_template == glm4.chat_template
    fast.save_pretrained(tmp_path / "fast")
    fast_again = GLMFastTokenizer.from_pretrained(tmp_path / "fast")
    text = "<|user|>\n你好 world<|assistant|>"
    assert fast_again.encode(text) == fast.encode(text) and fast_again.chat_template == fast.chat_template


def test_fast_tokenizer_follows_the_file_post_processor_and_renders_the_same_ids(glm4, fast):
    assert fast.encode("你好") == bpe(glm4, "你好")  # this tokenizer.json has no post-processor: no prefix
    messages = [{"role": "system", "content": "S", "tools": [GET_TIME]}, {"role": "user", "content": "几点了？"}]
    assert fast.apply_chat_template(messages) == glm4.apply_chat_template(messages)
    assert fast.decode(fast.apply_chat_template(messages), skip_special_tokens=True).startswith("\n" + PERSONA)


def test_bad_ranks_files_are_clear_errors(tmp_path):
    (tmp_path / "tokenizer.model").write_text("not a ranks line\n")
    with pytest.raises(ValueError, match="line 1 is not 'base64-token rank'"):
        GLM4Tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="without gaps"):
        GLM4Tokenizer(tmp_path / "tokenizer.model")
