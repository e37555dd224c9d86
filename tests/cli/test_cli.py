"""The `glmkit` command, driven through a real pseudo-terminal (pexpect) and as a subprocess."""

import json
import os
import signal
import subprocess
import sys
import threading

import pexpect
import pytest
import torch

import glmkit
from glmkit.cli.chat import answer_turn
from glmkit.text.chat_format import CHATGLM_6B

from tiny import write_chat_model

GLMKIT = [sys.executable, "-m", "glmkit"]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("cli-model"), tokenizer, silence_eop=True)


def spawn_chat(model_dir, *extra):
    child = pexpect.spawn(sys.executable, ["-m", "glmkit", "chat", "--model", str(model_dir), *extra],
                          encoding="utf-8", timeout=60, env={**os.environ, "TERM": "dumb"})
    child.expect("You: ")
    return child


def test_chat_session_in_a_terminal(model_dir):
    child = spawn_chat(model_dir, "--max-length", "60", "--seed", "1")
    assert "clear" in child.before and "Ctrl-C" in child.before  # the banner teaches the commands
    child.sendline("你好")
    child.expect("GLM: ")
    child.expect("You: ")
    first_answer = child.before.strip()
    assert len(first_answer) > 5
    # The history now outgrows max_length: the turn is refused with a reason, before any answer begins.
    child.sendline("a second question")
    child.expect(r"not answered: .*max_length=60.*raise --max-length")
    assert "GLM:" not in child.before
    child.expect("You: ")
    child.sendline("clear")
    child.expect(r"\(conversation cleared\)")
    child.expect("You: ")
    # After clear the first prompt fits again; a message over two lines, joined by a trailing backslash.
    child.sendline("line one \\")
    child.expect(r"\.\.\. ")
    child.sendline("line two")
    child.expect("GLM: ")
    child.expect("You: ")
    assert "not answered" not in child.before
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def endless_model_dir(tokenizer, tmp_path_factory):
    """Replies that cannot end by themselves within any test's time: <eop> silenced, 30,000 tokens of room."""
    return write_chat_model(tmp_path_factory.mktemp("endless-model"), tokenizer, silence_eop=True,
                            max_sequence_length=32768)


def test_ctrl_c_interrupts_a_reply_and_keeps_the_session(endless_model_dir):
    # Deterministic under load: the reply cannot finish before the signal lands, and Ctrl-C is a flag the
    # generation loop reads after every token, so the only wait is for the machine to get there.
    child = spawn_chat(endless_model_dir, "--max-length", "30000")
    child.sendline("tell me a long story")
    child.expect("GLM: ", timeout=120)
    child.expect(r"\S{3}", timeout=120)  # the answer is streaming
    child.kill(signal.SIGINT)
    child.expect(r"\[interrupted\]", timeout=120)
    child.expect("You: ", timeout=120)
    child.sendline("and then?")  # the session goes on
    child.expect("GLM: ", timeout=120)  # written once the first token is out: Ctrl-C now stops this answer
    child.kill(signal.SIGINT)
    child.expect(r"\[interrupted\]", timeout=120)
    child.expect("You: ", timeout=120)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    assert child.exitstatus == 0


def test_an_interrupted_reply_is_shown_but_not_kept(endless_model_dir, capsys):
    model, tokenizer = glmkit.load(endless_model_dir, progress=False)
    history = [("hi", "hello")]
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C while the answer streams
    timer.start()
    try:
        assert answer_turn(model, tokenizer, "tell me a long story", history, {"max_length": 30000, "seed": 0}) is None
    finally:
        timer.cancel()
    out = capsys.readouterr().out
    assert out.startswith("GLM: ") and out.endswith(" [interrupted]\n") and len(out) > len("GLM:  [interrupted]\n")
    assert history == [("hi", "hello")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C raises again at the prompt


def test_generate_prints_the_greedy_answer(model_dir):
    result = subprocess.run([*GLMKIT, "generate", "--model", str(model_dir), "--max-new-tokens", "12", "hello"],
                            capture_output=True, text=True, timeout=120, check=True)
    model, tokenizer = glmkit.load(model_dir, progress=False)
    ids = torch.tensor([tokenizer.encode("hello")])
    out = model.generate(ids, max_new_tokens=12)
    assert result.stdout == tokenizer.decode(out[0, ids.shape[1]:].tolist()) + "\n"
    assert CHATGLM_6B.parse(result.stdout)  # something was printed


def test_generate_reads_the_prompt_from_stdin(model_dir):
    run = [*GLMKIT, "generate", "--model", str(model_dir), "--max-new-tokens", "8"]
    piped = subprocess.run([*run, "-"], input="hello", capture_output=True, text=True, timeout=120, check=True)
    direct = subprocess.run([*run, "hello"], capture_output=True, text=True, timeout=120, check=True)
    assert piped.stdout == direct.stdout


def test_info(model_dir):
    result = subprocess.run([*GLMKIT, "info", str(model_dir), "--json"], capture_output=True, text=True, check=True)
    facts = json.loads(result.stdout)
    model, _ = glmkit.load(model_dir, progress=False)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["dtype_on_disk"] == ["float16"] and facts["tokenizer"] is True
    human = subprocess.run([*GLMKIT, "info", str(model_dir)], capture_output=True, text=True, check=True).stdout
    assert f"{facts['parameters']:,}" in human and "2 layers" in human


@pytest.mark.parametrize("args, message", [
    (["chat", "--model", "/no/such/dir"], "does not exist"),
    (["generate", "--model", "/no/such/dir", "hi"], "does not exist"),
    (["info", "/no/such/dir"], "does not exist"),
])
def test_bad_paths_give_one_clear_line(args, message):
    result = subprocess.run([*GLMKIT, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("glmkit: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_teaches():
    result = subprocess.run([*GLMKIT, "--help"], capture_output=True, text=True, check=True)
    for word in ("chat", "generate", "info", "Examples"):
        assert word in result.stdout
    chat_help = subprocess.run([*GLMKIT, "chat", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--model" in chat_help and "--temperature" in chat_help and "Ctrl-C" in chat_help
