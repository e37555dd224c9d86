"""The demo model's whole pipeline, end to end on a tiny slice: data, tokenizer, pre-training,
fine-tuning, evaluation and export. The data comes from the package registries (cached)."""

import json

import pytest

import glmkit
from glmkit.demo import build_demo


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
