"""Chat formats: ChatGLM-6B's official prompt, its system-text rule, reply clean-up and the ids a reply samples with."""

import pytest

from glmkit.text.chat_format import CHATGLM_6B, ChatFormatError


def test_prompt_format():
    assert CHATGLM_6B.prompt("你好") == "你好"
    history = [("你好", "你好👋!"), ("who", "me")]
    assert CHATGLM_6B.prompt("and?", history) == (
        "[Round 0]\n问：你好\n答：你好👋!\n[Round 1]\n问：who\n答：me\n[Round 2]\n问：and?\n答："
    )


@pytest.mark.parametrize("raw, clean", [
    ("  你好,世界!  ", "你好，世界！"),
    ("Hello, world!", "Hello, world!"),
    ("数字:1;2?对", "数字：1;2？对"),  # ";" touches no CJK character
    ("a:中", "a：中"),
    ("[[训练时间]]发布", "2023年发布"),
    ("中 , x", "中 , x"),
])
def test_process_response_rules(raw, clean):
    assert CHATGLM_6B.parse(raw) == clean



def test_system_text_goes_before_the_first_user_message_wherever_it_is():
    assert CHATGLM_6B.prompt("hi", system="Be brief.") == "Be brief.\n\nhi"
    assert CHATGLM_6B.prompt("and?", [("q0", "r0")], system="S") == "[Round 0]\n问：S\n\nq0\n答：r0\n[Round 1]\n问：and?\n答："


def test_render_reads_openai_messages_as_the_official_prompt():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
                {"role": "assistant", "content": "r0"}, {"role": "user", "content": "q1"}]
    assert CHATGLM_6B.render(messages) == "[Round 0]\n问：S\n\nq0\n答：r0\n[Round 1]\n问：q1\n答："


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "a"}], "the last message must come from the user"),
    ([{"role": "system", "content": "s"}], "the last message must come from the user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "  "}], "the last user message is empty"),
])
def test_render_refuses_conversations_it_cannot_write(messages, message):
    with pytest.raises(ChatFormatError, match=message):
        CHATGLM_6B.render(messages)


def test_chat_replies_end_at_eos_and_never_sample_the_bare_space(tokenizer):
    ids = CHATGLM_6B.sampling_ids(tokenizer)
    assert ids["eos_token_ids"] == (tokenizer.eos_token_id,)
    assert ids["invalid_score_token_id"] == tokenizer.convert_tokens_to_ids("\u2581") != tokenizer.unk_token_id
