"""Shared fixtures: a small ChatGLM-layout tokenizer trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmkit.text.tokenizer import ChatGLMTokenizer, train_sentencepiece

from samples import sample_corpus


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a freshly trained `ice_text.model` (1200 pieces) and tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tokenizer")
    return train_sentencepiece(sample_corpus(), out, vocab_size=1200, num_threads=1)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def pytorch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized layers on PyTorch's weight-only ops (float activations) instead of glmkit's native
    kernels (int8 activations): the path a machine without gcc or AVX2 takes, exact to the weights."""
    from glmkit.quant import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
