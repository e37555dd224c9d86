"""Streamed text is released only once it can no longer change."""

from glmkit.text.chat_format import CHATGLM_6B
from glmkit.text.streaming import TextStream, held_back


def test_held_back_never_shows_text_a_stop_string_could_still_claim():
    assert held_back("abc##", ["###"]) == ("abc", False)
    assert held_back("abc###def", ["###"]) == ("abc", True)
    assert held_back("abc#", ["#!", "zz"]) == ("abc", False)
    assert held_back("abc", []) == ("abc", False)


def feed(stream: TextStream, texts: list[str]) -> list[str]:
    return [stream.update(text) for text in texts]


def test_deltas_add_up_to_the_answer_and_wait_for_a_split_character():
    stream = TextStream()
    assert feed(stream, ["He", "Hel\ufffd", "Hel你", "Hel你好"]) == ["He", "", "l你", "好"]
    assert stream.finish("Hel你好") == "" and stream.final == stream.shown == "Hel你好"


def test_a_stop_string_ends_the_stream_and_is_never_shown():
    stream = TextStream(stops=["###"])
    assert feed(stream, ["ab#", "ab##", "ab###c"]) == ["ab", "", ""]
    assert stream.stopped and stream.shown == "ab"
    assert stream.finish("ab###c") == "" and stream.final == "ab"


def test_a_tail_that_only_began_a_stop_string_is_kept_at_the_end():
    stream = TextStream(stops=["###"])
    assert feed(stream, ["ab#"]) == ["ab"]
    assert stream.finish("ab#") == "#" and not stream.stopped


def test_with_a_clean_up_the_last_character_waits_until_its_neighbour_is_known():
    stream = TextStream(clean=CHATGLM_6B.parse, hold_last=True)
    # "好," becomes "好，" only once the comma is known to follow a CJK character: never retracted
    assert feed(stream, ["你好", "你好,", "你好,世"]) == ["你", "好", "，"]
    assert stream.finish("你好,世界") == "世界" and stream.final == "你好，世界"
