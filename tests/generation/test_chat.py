"""Chat: the official prompt format, response clean-up, streaming, stop strings, and load()."""

import pytest
import torch

import glmkit
from glmkit.generation.chat import stream_text
from glmkit.generation.sampling import SamplingParams
from glmkit.text.chat_format import CHATGLM_6B

from tiny import write_chat_model


@pytest.fixture(scope="module")
def loaded(tokenizer, tmp_path_factory):
    directory = write_chat_model(tmp_path_factory.mktemp("chat-model"), tokenizer)
    return glmkit.load(directory, progress=False)


def test_chat_matches_generate_on_the_same_prompt(loaded):
    model, tokenizer = loaded
    response, history = model.chat(tokenizer, "你好", history=[], do_sample=False, max_length=60)
    ids = torch.tensor([tokenizer.encode("你好")])
    out = model.generate(ids, max_length=60, eos_token_id=tokenizer.eos_token_id)
    expected = CHATGLM_6B.parse(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    assert response == expected and response
    assert history == [("你好", response)]


def test_second_turn_uses_the_history(loaded):
    model, tokenizer = loaded
    history = [("What is 1+1?", "2")]
    response, new_history = model.chat(tokenizer, "And 2+2?", history, do_sample=False, max_length=120)
    prompt = "[Round 0]\n问：What is 1+1?\n答：2\n[Round 1]\n问：And 2+2?\n答："
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = model.generate(ids, max_length=120, eos_token_id=tokenizer.eos_token_id)
    assert response == CHATGLM_6B.parse(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    assert new_history == history + [("And 2+2?", response)]


def test_stream_chat_grows_to_the_chat_answer(loaded):
    model, tokenizer = loaded
    kwargs = dict(do_sample=True, seed=3, max_length=50)
    streamed = [r for r, _ in model.stream_chat(tokenizer, "hello", [], **kwargs)]
    final, _ = model.chat(tokenizer, "hello", [], **kwargs)
    assert len(streamed) > 3 and streamed[-1] == final
    assert all(b.startswith(a.rstrip()[:-1]) for a, b in zip(streamed, streamed[1:], strict=False))


def test_stop_string_ends_generation_before_it(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("hello")
    full = list(stream_text(model, tokenizer, ids, SamplingParams(max_length=60)))[-1]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert len(stop) == 2
    cut = list(stream_text(model, tokenizer, ids, SamplingParams(max_length=60, stop=(stop,))))
    assert cut[-1] == full[: full.index(stop)]
    assert all(stop not in text for text in cut)


def test_history_longer_than_the_context_is_a_clear_error(loaded):
    model, tokenizer = loaded
    history = [("hello " * 300, "world " * 300)] * 2
    with pytest.raises(ValueError, match="context .* shorten the prompt or the history"):
        model.chat(tokenizer, "again", history)


def test_load_without_a_path_explains_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(glmkit.pretrained, "DEMO_MODEL_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="pass --model PATH"):
        glmkit.load()


def test_first_release_vocabulary_with_20000_image_tokens(tokenizer_dir, tmp_path):
    """The first ChatGLM-6B release put 20000 image tokens before the text pieces (ids 150xxx)."""
    from glmkit import ChatGLMTokenizer
    shifted = ChatGLMTokenizer(tokenizer_dir / "ice_text.model", num_image_tokens=20000)
    model, tokenizer = glmkit.load(write_chat_model(tmp_path, shifted), progress=False)
    assert tokenizer.num_image_tokens == 20000
    assert model.config.bos_token_id == tokenizer.bos_token_id == shifted.sp.piece_to_id("<sop>") + 20000
    ids = tokenizer.encode("hello")
    assert min(ids) >= 20000 and ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8)[0, len(ids):].tolist()
    response, _ = model.chat(tokenizer, "hello", do_sample=False, max_new_tokens=8)
    assert response == CHATGLM_6B.parse(tokenizer.decode([t for t in out if t >= 20000]))
