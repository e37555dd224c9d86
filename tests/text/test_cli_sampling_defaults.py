"""`glmkit chat` samples with the model family's own chat() defaults (spec 4.1, 4.2): ChatGLM2/3 and GLM-4 8192 /
top_p 0.8 / temperature 0.8, ChatGLM-6B 2048 / 0.7 / 0.95; a flag the user gives wins, and the one-shot commands
(`generate --sample`) keep ChatGLM-6B's values on ChatGLM-6B."""

import builtins

import pytest

import glmkit.cli
import glmkit.generation.chat as chat_module
from glmkit.cli import build_parser, sampling_kwargs
from glmkit.cli.common import load_from_args
from glmkit.generation.sampling import SamplingParams

REAL_CHAT_PARAMS = chat_module.chat_params


class Captured(Exception):  # not a user error: it leaves cmd_chat as it is raised
    pass


def chat_params_of(argv, monkeypatch):
    """The SamplingParams that `glmkit chat ARGV`'s first turn builds (cmd_chat -> answer_turn -> stream_chat)."""
    seen = []

    def capture(*args, **kwargs):
        seen.append(REAL_CHAT_PARAMS(*args, **kwargs))
        raise Captured

    monkeypatch.setattr(chat_module, "chat_params", capture)
    monkeypatch.setattr(builtins, "input", lambda prompt="": "你好")
    with pytest.raises(Captured):
        glmkit.cli.main(["chat", *argv])
    return seen[0]


def test_chat_on_chatglm3_samples_with_its_official_defaults(chatglm3_model, monkeypatch):
    params = chat_params_of(["--model", str(chatglm3_model)], monkeypatch)
    assert (params.max_length, params.top_p, params.temperature, params.top_k) == (8192, 0.8, 0.8, 50)
    assert params.do_sample is True
    given = chat_params_of(["--model", str(chatglm3_model), "--temperature", "0.3", "--max-length", "300"],
                           monkeypatch)
    assert (given.max_length, given.top_p, given.temperature) == (300, 0.8, 0.3)


def test_chat_on_chatglm_6b_keeps_its_defaults(monkeypatch):
    params = chat_params_of([], monkeypatch)  # the shipped ChatGLM-6B-format demo model
    assert (params.max_length, params.top_p, params.temperature, params.top_k) == (2048, 0.7, 0.95, 50)
    given = chat_params_of(["--top-p", "0.5", "--top-k", "7"], monkeypatch)
    assert (given.max_length, given.top_p, given.temperature, given.top_k) == (2048, 0.5, 0.95, 7)


def one_shot_params(argv) -> SamplingParams:
    """What `glmkit generate ARGV` samples with (cmd_generate: load_from_args, then sampling_kwargs)."""
    args = build_parser().parse_args(["generate", "x", *argv])
    load_from_args(args, progress=False)
    return SamplingParams(max_new_tokens=args.max_new_tokens, **sampling_kwargs(args))


def test_generate_sample_keeps_chatglm_6b_values_and_follows_the_family(chatglm3_model):
    six = one_shot_params(["--sample"])
    assert (six.do_sample, six.max_length, six.top_p, six.temperature, six.top_k) == (True, 2048, 0.7, 0.95, 50)
    three = one_shot_params(["--sample", "--model", str(chatglm3_model), "--top-k", "5"])
    assert (three.max_length, three.top_p, three.temperature, three.top_k) == (8192, 0.8, 0.8, 5)
    # without a loaded model (a parser alone) the values are ChatGLM-6B's, as before
    bare = sampling_kwargs(build_parser().parse_args(["generate", "x"]))
    assert (bare["max_length"], bare["top_p"], bare["temperature"], bare["top_k"]) == (2048, 0.7, 0.95, 50)
