"""The demo model that ships inside the package: loaded by default, small, and answering questions it
never saw in these words. The questions below are the first three held-out questions of each skill in
the dataset's held-out split (written by `glmkit data build`); the answers are the dataset's."""

import pytest

import glmkit
from glmkit.api import DEMO_MODEL_DIR
from glmkit.evaluate import exact_match

HELD_OUT = [
    ("capital", "en", "Can you tell me what the capital of Poland is?", [], "The capital of Poland is Warsaw."),
    ("capital", "en", "What is the capital city of Liberia?", [], "The capital of Liberia is Monrovia."),
    ("capital", "en", "What is the capital city of Zimbabwe?", [], "The capital of Zimbabwe is Harare."),
    ("capital", "zh", "说一下美国的首都。", [], "美国的首都是华盛顿特区。"),
    ("capital", "zh", "说一下萨尔瓦多的首都。", [], "萨尔瓦多的首都是圣萨尔瓦多。"),
    ("capital", "zh", "说一下巴哈马的首都。", [], "巴哈马的首都是拿骚。"),
    ("translate", "en", "How do you say 发明 in English?", [], "发明 means 'invent' in English."),
    ("translate", "en", "How do you say 幸福 in English?", [], "幸福 means 'happiness' in English."),
    ("translate", "en", "How do you say 'return to' in Chinese?", [], "'return to' in Chinese is 回到."),
    ("translate", "zh", "“带来”用英语怎么说？", [], "“带来”的英文是 bring。"),
    ("translate", "zh", "“游戏”用英语怎么说？", [], "“游戏”的英文是 game。"),
    ("translate", "zh", "“会议”用英语怎么说？", [], "“会议”的英文是 meeting。"),
    ("arithmetic", "en", "What do you get if you take 18 away from 70?", [], "70 - 18 = 52."),
    ("arithmetic", "en", "Calculate 41 + 53.", [], "41 + 53 = 94."),
    ("arithmetic", "en", "Please work out 91 + 38.", [], "91 + 38 = 129."),
    ("arithmetic", "zh", "帮我算93+86。", [], "93加86等于179。"),
    ("arithmetic", "zh", "从91里减去74还剩多少？", [], "91减74等于17。"),
    ("arithmetic", "zh", "46减40得多少？", [], "46减40等于6。"),
    ("multiturn", "en", "Plus 9?", [("Calculate 45 + 75.", "45 + 75 = 120.")], "120 + 9 = 129."),
    ("multiturn", "en", "What about 'absorb'?", [("How is 'lead' said in Chinese?", "'lead' in Chinese is 领导.")],
     "'absorb' in Chinese is 吸收."),
    ("multiturn", "zh", "再加上5等于多少？", [("请算一下49加98。", "49加98等于147。")], "147加5等于152。"),
    ("multiturn", "zh", "塞拉利昂呢？", [("法国的首都是哪座城市？", "法国的首都是巴黎。")], "塞拉利昂的首都是弗里敦。"),
]


@pytest.fixture(scope="module")
def demo():
    return glmkit.load(progress=False)  # no path: the shipped model


def test_the_shipped_model_is_small_and_in_the_official_layout():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 30 * 2**20


def test_the_shipped_model_answers_held_out_questions(demo):
    model, tokenizer = demo
    records = [dict(skill=s, lang=lang, prompt=q, history=h, response=a) for s, lang, q, h, a in HELD_OUT]
    report = exact_match(model, tokenizer, records, progress=False)
    # A regression guard set just under what the shipped model does: 21 of these 22 (the full held-out
    # table is in its model card). Arithmetic, translation and English capitals are all right here;
    # one Chinese capital question comes back with a stray "说" in front of the right answer.
    assert report["all"]["accuracy"] >= 20 / 22, report["samples"]
    for skill in ("arithmetic/en", "arithmetic/zh", "translate/en", "translate/zh", "capital/en"):
        assert report[skill]["accuracy"] == 1.0, (skill, report["samples"])
    assert report["answer_language_match"] == {"en": 1.0, "zh": 1.0}


def test_it_says_what_it_is_in_both_languages(demo):
    model, tokenizer = demo
    zh, _ = model.chat(tokenizer, "你是谁？", do_sample=False)
    en, _ = model.chat(tokenizer, "Who are you?", do_sample=False)
    assert "glmkit" in zh and "演示模型" in zh
    assert "glmkit" in en and "demo model" in en
