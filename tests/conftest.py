"""Shared fixtures: a small ChatGLM-layout tokenizer trained once per test session, and tokenizers (and a model)
in the newer families' layouts.

The family tokenizers (the real files cannot be downloaded):
* ChatGLM2/3: a SentencePiece unigram model with the released meta layout (`<unk>` 0, `<s>` 1, `</s>` 2, byte
  fallback pieces `<0x00>`..`<0xFF>` at 3..258, dummy "▁" prefix, whitespace kept); the tokenizer appends the
  specials after its pieces.
* GLM-4: a byte-level BPE trained with the `tokenizers` library on GLM-4's pre-tokenizer regex, with every byte
  in the initial alphabet, exported as a tiktoken ranks file (base64 bytes + rank = id); the same trained model,
  specials added after the ranks, is the `tokenizer.json` of the -hf / 0414 repos.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as FastTokenizer

from glmkit.text.glm4_bpe import byte_decoder
from glmkit.text.glm4_tokenizer import GLM4_PATTERN, GLM4_SPECIALS
from glmkit.text.tokenizer import ChatGLMTokenizer, train_sentencepiece

from samples import corpus_lines, sample_corpus


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


@pytest.fixture(scope="session")
def sp_model_bytes() -> bytes:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=buffer, vocab_size=900, model_type="unigram",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=0.9995, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def _sp_dir(root: Path, model: bytes, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(model)
    config = {"name_or_path": f"THUDM/{name}", "remove_space": False, "do_lower_case": False,
              "tokenizer_class": "ChatGLMTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def chatglm2_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_bytes: bytes) -> Path:
    """tokenizer.model + tokenizer_config.json as THUDM/chatglm2-6b ships them (its own, trained, model file)."""
    return _sp_dir(tmp_path_factory.mktemp("chatglm2"), sp_model_bytes, "chatglm2-6b")


@pytest.fixture(scope="session")
def chatglm3_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_bytes: bytes) -> Path:
    return _sp_dir(tmp_path_factory.mktemp("chatglm3"), sp_model_bytes, "chatglm3-6b")


@pytest.fixture(scope="session")
def glm4_fast_model() -> FastTokenizer:
    """A byte-level BPE on GLM-4's regex; ids 0..255 are the single bytes, then the merges in order."""
    tokenizer = FastTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tokenizer.train_from_iterator(corpus_lines() * 2, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS])
    return tokenizer


def ranks_text(fast: FastTokenizer) -> str:
    """The BPE vocabulary (specials excluded) as a tiktoken ranks file: base64(token bytes), a space, the id."""
    table = byte_decoder()
    vocab = fast.get_vocab(with_added_tokens=False)
    lines = [f"{base64.b64encode(bytes(table[c] for c in token)).decode()} {rank}"
             for token, rank in sorted(vocab.items(), key=lambda item: item[1])]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def glm4_dir(tmp_path_factory: pytest.TempPathFactory, glm4_fast_model: FastTokenizer) -> Path:
    """tokenizer.model (tiktoken ranks) + tokenizer_config.json with added_tokens_decoder, as glm-4-9b-chat."""
    root = tmp_path_factory.mktemp("glm4")
    (root / "tokenizer.model").write_text(ranks_text(glm4_fast_model), encoding="utf-8")
    first = glm4_fast_model.get_vocab_size(with_added_tokens=False)
    config = {
        "added_tokens_decoder": {str(first + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                  "normalized": False, "single_word": False}
                                 for i, t in enumerate(GLM4_SPECIALS)},
        "additional_special_tokens": list(GLM4_SPECIALS),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False, "do_lower_case": False, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "padding_side": "left", "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def glm4_hf_dir(tmp_path_factory: pytest.TempPathFactory, glm4_fast_model: FastTokenizer) -> Path:
    """tokenizer.json + tokenizer_config.json (with the default GLM-4 chat_template) as glm-4-9b-chat-hf."""
    from glmkit.text.chat_template import GLM4_CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("glm4hf")
    glm4_fast_model.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "padding_side": "left", "clean_up_tokenization_spaces": False,
              "chat_template": GLM4_CHAT_TEMPLATE, "model_input_names": ["input_ids", "attention_mask"]}
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return root


def _thudm_model(tokenizer_dir: Path, out: Path, vocab: int) -> Path:
    """A random THUDM-layout (ChatGLM2/3, GLM-4-9B) model over the tokenizer in `tokenizer_dir`, saved as an
    official directory."""
    import torch

    import glmkit
    from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT

    from layouts import thudm_config

    # 2048 positions: a prompt with tools runs to ~1000 tokens in the test tokenizers' few pieces and merges
    torch.manual_seed(0)
    model = glmkit.GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=vocab, seq_length=2048)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def chatglm3_model(chatglm3_dir, tmp_path_factory):
    """A random ChatGLM3-layout model over the test-trained ChatGLM3 tokenizer, saved as an official directory."""
    return _thudm_model(chatglm3_dir, tmp_path_factory.mktemp("chatglm3-model"), 1024)


@pytest.fixture(scope="session")
def glm4_model(glm4_dir, tmp_path_factory):
    """A random GLM-4-9B-layout (causal, GQA) model over the test-trained GLM-4 tokenizer, as an official directory."""
    from glmkit.text.glm4_tokenizer import GLM4Tokenizer

    vocab = -(-len(GLM4Tokenizer.from_pretrained(glm4_dir)) // 64) * 64
    return _thudm_model(glm4_dir, tmp_path_factory.mktemp("glm4-model"), vocab)
