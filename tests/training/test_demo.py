"""The demo model's whole pipeline, end to end on a tiny slice: data, tokenizer, pre-training,
fine-tuning, evaluation and export. The data comes from the package registries (cached)."""

import json

import pytest

import glmkit
from glmkit.training.demo import build_demo, chinese_word_chunks, weighted


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-work")
    out = work / "export"
    try:
        report = build_demo(work, out, tiny=True, progress=False)
    except ConnectionError as e:  # the only thing allowed to stop this test is an unreachable registry
        pytest.skip(f"package registries unreachable: {e}")
    return work, out, report


@pytest.mark.slow
def test_pipeline_exports_a_loadable_chat_model(built):
    work, out, report = built
    model, tokenizer = glmkit.load(out, progress=False)
    response, history = model.chat(tokenizer, "你好", do_sample=False, max_length=64)
    assert history == [("你好", response)]
    assert (out / "model.safetensors").exists() and (out / "ice_text.model").exists()
    assert "Held-out exact match" in (out / "README.md").read_text()
    meta = json.loads((out / "eval.json").read_text())
    assert meta["sources"] and all(s["licence"] for s in meta["sources"])
    ppl = report["perplexity"]
    assert set(ppl) == {"pretrained", "fine_tuned"} and all(v > 1 for v in ppl["pretrained"].values())
    assert report["exact_match"]["all"]["total"] > 0


@pytest.mark.slow
def test_rerunning_the_build_resumes_instead_of_starting_over(built):
    work, out, _ = built
    before = (work / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    build_demo(work, out, tiny=True, progress=False)
    assert (work / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert (work / "pretrain" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_eval_chat_prints_a_table_per_skill_and_language(built):
    import subprocess
    import sys
    work, out, _ = built
    result = subprocess.run([sys.executable, "-m", "glmkit", "eval-chat", "--model", str(out), "--data",
                             str(work / "data" / "sft" / "heldout.jsonl"), "--by-template"],
                            capture_output=True, text=True, check=True, timeout=300)
    assert "capital/en" in result.stdout and "capital/zh" in result.stdout and "all" in result.stdout
    held = [json.loads(line) for line in (work / "data" / "sft" / "heldout.jsonl").open(encoding="utf-8")]
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if "#" in line.split(" ", 1)[0]}
    for r in held:  # one row per held-out phrasing, showing one of its questions
        if r["skill"] == "capital" and r["lang"] == "zh":
            row = rows[f"capital/zh#{r['template']}"]
            assert any(q["prompt"] in row for q in held if q["template"] == r["template"] and q["skill"] == "capital")
    assert "answers in the reference answer's language" in result.stdout


@pytest.mark.slow
def test_tokenizer_pieces_stay_inside_chinese_words(built):
    """The chat templates repeat thousands of times; names must not fuse with them (e.g. "国的首都")."""
    work, _, _ = built
    tokenizer = glmkit.ChatGLMTokenizer.from_pretrained(work / "tokenizer")
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("说一下英国的首都。", add_special_tokens=False)]
    assert not any("国" in p and len(p) > 1 and p not in ("英国",) for p in pieces), pieces
    assert "".join(pieces) == "说一下英国的首都。"


def test_chinese_word_chunks_cut_between_words_only_where_chinese_is():
    assert chinese_word_chunks("说一下英国的首都。") == ["说", "一下", "英国", "的", "首都", "。"]
    # English stays whole, and a space goes with the word after it, as SentencePiece's "▁" does.
    assert chinese_word_chunks("把 state 翻译成中文。") == ["把", " state", " 翻译成", "中文", "。"]
    assert chinese_word_chunks("What is 23 plus 45?") == ["What is 23 plus 45?"]
    for text in ("  ", "你好 ", " 你好", "“苹果”的英文是 apple。<n>你好"):
        assert "".join(chinese_word_chunks(text)) == text


def test_language_of_answers():
    from glmkit.eval.skills import language_of
    assert language_of("'apple' in Chinese is 苹果.") == "en"
    assert language_of("“苹果”的英文是 apple。") == "zh"
    assert language_of("37 + 45 = 82.") == "en" and language_of("37加45等于82。") == "zh"


def test_skill_weights_repeat_and_subsample_records_deterministically():
    records = [{"skill": "capital", "i": i} for i in range(100)] + [{"skill": "poem", "i": i} for i in range(1000)]
    mixed = weighted(records, {"capital": 3, "poem": 0.1}, seed=0)
    assert sum(r["skill"] == "capital" for r in mixed) == 300
    assert 60 < sum(r["skill"] == "poem" for r in mixed) < 140  # about a tenth, seeded
    assert mixed == weighted(records, {"capital": 3, "poem": 0.1}, seed=0)
    assert weighted(records, {}, seed=0) == records


def test_language_specific_weight_overrides_the_skill_weight():
    records = [{"skill": "capital", "lang": lang} for lang in ("en", "zh") for _ in range(10)]
    mixed = weighted(records, {"capital": 2, "capital/zh": 5}, seed=0)
    assert sum(r["lang"] == "en" for r in mixed) == 20
    assert sum(r["lang"] == "zh" for r in mixed) == 50


def test_interleave_takes_every_nth_step_from_the_other_source():
    from glmkit.training.loop import Batches, interleave
    mixed = interleave(Batches(lambda step, micro: ["main", step]), Batches(lambda step, micro: ["other", step]), 4)
    sources = [mixed.batch(step, 0)[0] for step in range(8)]
    assert sources == ["main", "main", "main", "other", "main", "main", "main", "other"]
