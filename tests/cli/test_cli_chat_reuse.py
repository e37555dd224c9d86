"""`glmkit chat` on a causal family continues the last turn's KV cache; --no-cache-reuse prefills every turn in
full, and the conversation reads the same either way."""

from __future__ import annotations

import subprocess
import sys

import glmkit
from glmkit.cli import build_parser
from glmkit.cli.chat import answer_turn


def test_the_flag_turns_reuse_off():
    parser = build_parser()
    assert parser.parse_args(["chat"]).cache_reuse is True
    assert parser.parse_args(["chat", "--no-cache-reuse"]).cache_reuse is False


def test_answer_turn_continues_the_cache_and_answers_the_same(chatglm3_model, capsys):
    model, tokenizer = glmkit.load(chatglm3_model, progress=False)
    options = {"max_length": 400, "do_sample": False}
    history, prefills = [], []
    for query in ("你好", "how are you", "tell me more"):
        history = answer_turn(model, tokenizer, query, history, {**options, "reuse_cache": True})
        prefills.append(model.last_prefill.cached)
    reused_out = capsys.readouterr().out
    assert prefills[0] == 0 and all(n > 0 for n in prefills[1:])
    model.clear_kv_cache()
    full = []
    for query in ("你好", "how are you", "tell me more"):
        full = answer_turn(model, tokenizer, query, full, {**options, "reuse_cache": False})
        assert model.last_prefill.cached == 0
    assert full == history and capsys.readouterr().out == reused_out


def test_the_terminal_session_reads_the_same_with_and_without_reuse(chatglm3_model):
    messages = "你好\nhow are you\nclear\ntell me more\nagain\nstop\n"

    def session(*extra: str) -> str:
        result = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--model", str(chatglm3_model), "--greedy",
                                 "--max-length", "300", *extra], input=messages, capture_output=True, text=True,
                                timeout=120, check=True)
        return result.stdout

    reused = session()
    assert reused.count("GLM: ") == 4 and "(conversation cleared)" in reused
    assert session("--no-cache-reuse") == reused
    help_text = subprocess.run([sys.executable, "-m", "glmkit", "chat", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--no-cache-reuse" in help_text
