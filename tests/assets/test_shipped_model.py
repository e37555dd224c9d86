"""The demo model that ships inside the package: loaded by default, small, and answering questions it
never saw in these words. The questions below are the first three held-out questions of each skill in
the dataset's held-out split (written by `glmkit data build`); the answers are the dataset's."""

import json

import pytest

import glmkit
from glmkit.eval.skills import exact_match
from glmkit.pretrained import DEMO_MODEL_DIR
from glmkit.training.demo import model_card

HELD_OUT = [
    ('capital', 'en', 'Can you tell me what the capital of Thailand is?', [], 'The capital of Thailand is Bangkok.'),
    ('capital', 'en', 'Can you tell me what the capital of Bhutan is?', [], 'The capital of Bhutan is Thimphu.'),
    ('capital', 'en', 'Can you tell me what the capital of Bosnia and Herzegovina is?', [],
     'The capital of Bosnia and Herzegovina is Sarajevo.'),
    ('capital', 'zh', '约旦的首都是哪里？', [], '约旦的首都是安曼。'),
    ('capital', 'zh', '巴基斯坦的首都是哪里？', [], '巴基斯坦的首都是伊斯兰堡。'),
    ('capital', 'zh', '说一下佛得角的首都。', [], '佛得角的首都是普拉亚。'),
    ('translate', 'en', "How do you say 'throw into' in Chinese?", [], "'throw into' in Chinese is 投入."),
    ('translate', 'en', 'How do you say 公主 in English?', [], "公主 means 'princess' in English."),
    ('translate', 'en', "How do you say 'challenge' in Chinese?", [], "'challenge' in Chinese is 挑战."),
    ('translate', 'zh', '把 military strength 翻译成中文。', [], 'military strength 的意思是“兵力”。'),
    ('translate', 'zh', '“比较”用英语怎么说？', [], '“比较”的英文是 compare。'),
    ('translate', 'zh', '“资格”用英语怎么说？', [], '“资格”的英文是 qualifications。'),
    ('arithmetic', 'en', 'Add 94 and 90.', [], '94 + 90 = 184.'),
    ('arithmetic', 'en', 'How much is 96 - 91?', [], '96 - 91 = 5.'),
    ('arithmetic', 'en', 'What is 77 plus 55?', [], '77 + 55 = 132.'),
    ('arithmetic', 'zh', '36加14得多少？', [], '36加14等于50。'),
    ('arithmetic', 'zh', '87减去60是多少？', [], '87减60等于27。'),
    ('arithmetic', 'zh', '96减91等于多少？', [], '96减91等于5。'),
    ('multiturn', 'en', 'Plus 1?', [('What is 39 plus 57?', '39 + 57 = 96.')], '96 + 1 = 97.'),
    ('multiturn', 'en', "What about 'react'?", [("How do I say 'work' in Chinese?", "'work' in Chinese is 工作.")],
     "'react' in Chinese is 反应."),
    ('multiturn', 'en', "What about 'value'?", [("How is 'people' said in Chinese?", "'people' in Chinese is 人民.")],
     "'value' in Chinese is 价值."),
    ('multiturn', 'zh', '瑙鲁呢？', [('菲律宾的首都是哪座城市？', '菲律宾的首都是马尼拉。')], '瑙鲁的首都是亚伦。'),
    ('multiturn', 'zh', '苏里南呢？', [('卢森堡的首都叫什么？', '卢森堡的首都是卢森堡。'), ('捷克呢？', '捷克的首都是布拉格。')], '苏里南的首都是帕拉马里博。'),
    ('multiturn', 'zh', '叙利亚呢？', [('请回答：厄立特里亚的首都是哪座城市？', '厄立特里亚的首都是阿斯马拉。')], '叙利亚的首都是大马士革。'),
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
    # A regression guard set just under what the shipped model does: 24 of these 24 (the full held-out
    # table is in its model card). Every capital, translation and arithmetic question must be right,
    # "说一下佛得角的首都。" included (the previous model answered it "说佛得角..."); one follow-up may slip.
    assert report["all"]["accuracy"] >= 23 / 24, report["samples"]
    for skill in ("arithmetic/en", "arithmetic/zh", "translate/en", "translate/zh", "capital/en", "capital/zh"):
        assert report[skill]["accuracy"] == 1.0, (skill, report["samples"])
    assert report["answer_language_match"] == {"en": 1.0, "zh": 1.0}


def test_it_says_what_it_is_in_both_languages(demo):
    model, tokenizer = demo
    zh, _ = model.chat(tokenizer, "你是谁？", do_sample=False)
    en, _ = model.chat(tokenizer, "Who are you?", do_sample=False)
    assert "glmkit" in zh and "演示模型" in zh
    assert "glmkit" in en and "demo model" in en


def test_the_model_card_is_written_from_the_models_measurements():
    """The card is the generator's output for eval.json, and eval.json records #5's targets as met."""
    meta = json.loads((DEMO_MODEL_DIR / "eval.json").read_text(encoding="utf-8"))
    assert (DEMO_MODEL_DIR / "README.md").read_text(encoding="utf-8") == model_card(meta)
    accuracy = meta["evaluation"]["exact_match"]
    for skill in ("capital", "translate", "arithmetic"):
        for lang in ("en", "zh"):
            assert accuracy[f"{skill}/{lang}"]["accuracy"] >= 0.9, (skill, lang)
            assert accuracy[f"{skill}/{lang}"]["total"] >= 60


def test_accuracy_per_phrasing_in_template_order(demo):
    model, tokenizer = demo
    records = [dict(skill="capital", lang="zh", prompt=q, history=[], response=a, template=t) for q, a, t in [
        ("说一下约旦的首都。", "约旦的首都是安曼。", 10), ("约旦的首都是哪里？", "约旦的首都是安曼。", 2),
        ("约旦的首都是哪里？", "约旦的首都是巴黎。", 2), ("约旦首都？", "约旦的首都是安曼。", "extra")]]
    rows = exact_match(model, tokenizer, records, progress=False)["by_template"]
    assert list(rows) == ["capital/zh#2", "capital/zh#10", "capital/zh#extra"]  # 2 before 10; names last
    assert (rows["capital/zh#2"]["correct"], rows["capital/zh#2"]["total"]) == (1, 2)
    assert rows["capital/zh#10"] == {"correct": 1, "total": 1, "accuracy": 1.0, "example": "说一下约旦的首都。"}
