"""AutoTokenizer picks the tokenizer from the files an official repo ships, and says clearly when it cannot."""

import json
import shutil

import pytest

from glmkit.text.auto import AutoTokenizer, TokenizerNotFoundError
from glmkit.text.chatglm3_tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer
from glmkit.text.fast_tokenizer import GLMFastTokenizer
from glmkit.text.glm4_tokenizer import GLM4Tokenizer
from glmkit.text.protocol import Tokenizer
from glmkit.text.tokenizer import ChatGLMTokenizer


@pytest.mark.parametrize("fixture, cls", [
    ("tokenizer_dir", ChatGLMTokenizer), ("chatglm2_dir", ChatGLM2Tokenizer), ("chatglm3_dir", ChatGLM3Tokenizer),
    ("glm4_dir", GLM4Tokenizer), ("glm4_hf_dir", GLMFastTokenizer),
])
def test_each_official_layout_loads_its_tokenizer(request, fixture, cls):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    assert type(tokenizer) is cls and isinstance(tokenizer, Tokenizer)


def test_chatglm2_and_3_share_a_file_and_are_told_apart(tmp_path, chatglm3_dir):
    shutil.copy(chatglm3_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is ChatGLM3Tokenizer  # a lone file: the superset
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm2-6b", "padded_vocab_size": 65024}))
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is ChatGLM2Tokenizer
    (tmp_path / "config.json").unlink()
    (tmp_path / "tokenization_chatglm.py").write_text('ROLES = ["<|user|>", "<|observation|>"]\n')
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is ChatGLM3Tokenizer


def test_a_mismatching_directory_is_one_clear_error_naming_the_files(tmp_path, chatglm3_dir):
    shutil.copy(chatglm3_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLM4Tokenizer"}))
    with pytest.raises(TokenizerNotFoundError, match=r"names ChatGLM4Tokenizer, but tokenizer.model is a "
                                                     r"SentencePiece model \(files: tokenizer.model, tokenizer_config.json\)"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_an_unknown_directory_names_what_it_found(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerNotFoundError, match="holds no GLM tokenizer.*found: vocab.txt"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AutoTokenizer.from_pretrained(tmp_path / "missing")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path, glm4_dir):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(glm4_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"padded_vocab_size": 1000}))
    with pytest.raises(TokenizerNotFoundError, match="does not belong to this model"):
        AutoTokenizer.from_pretrained(tmp_path)
