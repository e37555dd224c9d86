"""Tiny random models in the official layout, for tests (no weights can be downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmkit import GLMForCausalLM
from glmkit.models.config import GLMConfig, glm130b_architecture

# Special ids of the tiny id-only vocabulary (the tokenizer-backed models take theirs from the tokenizer).
MASK, GMASK, SOP, EOP, PAD = 250, 251, 252, 253, 3
SMASK, EOS = 254, 2  # GLM-130B's [sMASK] and text `</s>`


def tiny_config(**overrides) -> GLMConfig:
    base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
                max_sequence_length=96, bos_token_id=SOP, eos_token_id=EOP, mask_token_id=MASK,
                gmask_token_id=GMASK, pad_token_id=PAD, torch_dtype="float32")
    return GLMConfig(**{**base, **overrides})


def tiny_glm130b_config(**overrides) -> GLMConfig:
    """GLM-130B's architecture (GeGLU, 1D rotary with the fp16 table, alpha from the depth) at toy size,
    over the tiny id-only vocabulary."""
    sizes = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, inner_hidden_size=96,
                 max_sequence_length=96, bos_token_id=SOP, eos_token_id=EOP, mask_token_id=MASK,
                 gmask_token_id=GMASK, smask_token_id=SMASK, text_eos_token_id=EOS, pad_token_id=0,
                 torch_dtype="float32")
    sizes.update(overrides)
    return GLMConfig(**glm130b_architecture(sizes.pop("num_layers", 2), **sizes))


def random_model(config: GLMConfig | None = None, seed: int = 0) -> GLMForCausalLM:
    """Weights large enough that the logits are far from uniform, so greedy paths are decisive."""
    torch.manual_seed(seed)
    model = GLMForCausalLM(config or tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.normal_(1.0, 0.1) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.15)
    return model


def prompt(*body: int) -> list[int]:
    """A GLM generation prompt: body [gMASK] <sop>."""
    return [*body, GMASK, SOP]


def write_official_bin(model: GLMForCausalLM, directory: Path, shards: int = 2) -> Path:
    """Write the layout of THUDM/chatglm-6b by hand: fp16 pickled shards, an index, the stored copy of
    lm_head and every layer's rotary inv_freq buffer, as the official repository has them."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    head_dim = model.config.head_dim // 2
    for i in range(model.config.num_layers):
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv.half()
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[s * per:(s + 1) * per]}
        torch.save(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    config = model.config.to_dict()
    config.update(torch_dtype="float16", architectures=["ChatGLMModel"])
    for key in ("residual_alpha", "rotary_base", "mlp_type"):  # the official config has none of glmkit's keys
        config.pop(key)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def fp16_rounded(model: GLMForCausalLM) -> GLMForCausalLM:
    """The same model with weights rounded through fp16, as they come back from an fp16 checkpoint."""
    copy = GLMForCausalLM(model.config).eval()
    copy.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return copy


def write_chat_model(directory: Path, tokenizer, silence_eop: bool = False, **overrides) -> Path:
    """A random model over a real (test-trained) tokenizer, saved as a complete model directory.

    The output layer is untied: with DeepNorm's residual scale a random tied model just repeats its
    last token. silence_eop zeroes <eop>'s output row, so its logit is 0 while the top candidates are
    large: sampled replies then run to max_length, which interrupt tests need."""
    vocab = -(-tokenizer.vocab_size // 64) * 64
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = tiny_config(**{"vocab_size": vocab, "max_sequence_length": 2048, "tie_word_embeddings": False, **ids,
                            **overrides})
    model = random_model(config)
    if silence_eop:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(directory, dtype="float16")
    tokenizer.save_pretrained(directory)
    return directory
