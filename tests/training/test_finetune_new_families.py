"""LoRA and P-Tuning v2 on the new families: a tiny ChatGLM3-format model (THUDM layout, test-trained ChatGLM3
tokenizer) trains a few steps, saves its adapter in the family's official names, reloads to identical logits and
merges; an official ChatGLM2/3 P-Tuning directory written by hand loads; transformers' split q/k/v layout and
GLM-4's PEFT prefix tuning map both ways."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import glmkit
from glmkit import GLMForCausalLM
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.families.transformers_glm import GLM as HF_GLM
from glmkit.peft.adapters import LoraConfig, LoRALinear, add_lora, add_prefix, load_adapter, merge_adapter, save_adapter
from glmkit.text.formats import chat_format_for
from glmkit.training.finetune import FinetuneConfig, chat_examples, finetune
from glmkit.training.loop import TrainConfig
from glmkit.training.objectives import IGNORE, collate

from layouts import hf_config, thudm_config
from tiny import random_model

RECORDS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a + b}", "history": []}
           for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]


@pytest.fixture(scope="module")
def chatglm3_fp32_model(chatglm3_dir, tmp_path_factory) -> Path:
    """An fp32 ChatGLM3 model (trainable in fp32, unlike the shared fp16 chatglm3_model)."""
    out = tmp_path_factory.mktemp("chatglm3-model")
    random_model(THUDM_LAYOUT.config(thudm_config(padded_vocab_size=1024, seq_length=512, torch_dtype="float32")),
                 seed=0).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(chatglm3_dir / name, out / name)
    return out


def quick(method, **kwargs):
    train = TrainConfig(steps=6, batch_size=4, lr=3e-2 if method == "ptuning" else 5e-3, min_lr=1e-4, warmup_steps=0,
                        eval_every=1000, save_every=1000, seq_len=64)
    return FinetuneConfig(method=method, train=train, max_source_length=32, max_target_length=16, pre_seq_len=4,
                          **kwargs)


def logits(model, tokenizer):
    ids = torch.tensor([tokenizer.build_chat_input("What is 2 plus 2?")["input_ids"][0].tolist()])
    with torch.no_grad():
        return model(ids).logits[0]


def test_lora_trains_saves_in_thudm_names_reloads_and_merges(chatglm3_fp32_model, tmp_path):
    model, tokenizer = glmkit.load(chatglm3_fp32_model, progress=False)
    finetune(model, tokenizer, RECORDS, tmp_path / "lora", quick("lora"), progress=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"]  # PEFT's ChatGLM default
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value.lora_{ab}.weight"
                    for i in range(2) for ab in "AB"}
    expected = logits(model, tokenizer)
    reloaded = GLMForCausalLM.from_pretrained(chatglm3_fp32_model, progress=False, adapter=tmp_path / "lora")
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, atol=0, rtol=0)
    merge_adapter(reloaded)
    assert not any(isinstance(m, LoRALinear) for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, atol=1e-5, rtol=0)
    from glmkit.cli import main as cli_main

    assert cli_main(["merge", "--model", str(chatglm3_fp32_model), "--adapter", str(tmp_path / "lora"),
                     "--output", str(tmp_path / "merged")]) == 0
    merged = GLMForCausalLM.from_pretrained(tmp_path / "merged", progress=False)
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:  # the official layout again
        assert "transformer.encoder.layers.0.self_attention.query_key_value.weight" in set(f.keys())


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_p_tuning_v2_trains_in_the_official_chatglm2_3_layout_and_reloads(chatglm3_fp32_model, tmp_path, projection):
    model, tokenizer = glmkit.load(chatglm3_fp32_model, progress=False)
    base = logits(model, tokenizer)
    finetune(model, tokenizer, RECORDS, tmp_path / "pt", quick("ptuning", prefix_projection=projection),
             progress=False)
    expected = logits(model, tokenizer)
    assert not torch.allclose(expected, base)
    kv_size = 2 * 2 * 2 * 16  # num_layers * 2 * multi_query_group_num * kv_channels (spec 5.1)
    with safe_open(str(tmp_path / "pt" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
    if projection:
        assert shapes == {"transformer.prefix_encoder.embedding.weight": (4, kv_size),
                          "transformer.prefix_encoder.trans.0.weight": (64, kv_size),
                          "transformer.prefix_encoder.trans.0.bias": (64,),
                          "transformer.prefix_encoder.trans.2.weight": (kv_size, 64),
                          "transformer.prefix_encoder.trans.2.bias": (kv_size,)}
    else:
        assert shapes == {"transformer.prefix_encoder.embedding.weight": (4, kv_size)}
    reloaded = GLMForCausalLM.from_pretrained(chatglm3_fp32_model, progress=False, adapter=tmp_path / "pt")
    torch.testing.assert_close(logits(reloaded, tokenizer), expected, atol=0, rtol=0)
    # merged: the official P-Tuning model directory (config pre_seq_len, transformer.prefix_encoder.* weights)
    merge_adapter(reloaded).save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config.get("prefix_projection", False) is projection
    torch.testing.assert_close(logits(GLMForCausalLM.from_pretrained(tmp_path / "merged", progress=False),
                                      tokenizer), expected, atol=1e-6, rtol=0)


def batch_loss(model, tokenizer) -> float:
    batch = collate(chat_examples(RECORDS, tokenizer, 32, 16, chat_format_for(tokenizer)), 0)
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE).item()


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_training_lowers_the_loss_on_the_answers(chatglm3_fp32_model, tmp_path, method):
    model, tokenizer = glmkit.load(chatglm3_fp32_model, progress=False)
    before = batch_loss(model, tokenizer)
    finetune(model, tokenizer, RECORDS, tmp_path / method, quick(method), progress=False)
    assert batch_loss(model, tokenizer) < before - 0.05, method


def test_causal_examples_learn_the_answer_and_the_end_token(chatglm3_fp32_model):
    tokenizer = glmkit.load(chatglm3_fp32_model, progress=False)[1]
    example = chat_examples(RECORDS[:1], tokenizer, 32, 16, chat_format_for(tokenizer))[0]
    prompt = tokenizer.build_chat_input(RECORDS[0]["prompt"])["input_ids"][0].tolist()
    answer = tokenizer.encode("3", add_special_tokens=False)
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE] * (len(prompt) - 1) + answer + [tokenizer.eos_token_id]
    assert example.positions == list(range(len(prompt) + len(answer))) and example.context_length == 0


def test_an_official_chatglm3_p_tuning_checkpoint_written_by_hand_loads(chatglm3_fp32_model, tmp_path):
    """ptuning/main.py's output: the THUDM config.json with pre_seq_len and prefix_projection, and the prefix in
    pytorch_model.bin (or model.safetensors) under the official names."""
    model, tokenizer = glmkit.load(chatglm3_fp32_model, progress=False)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(3, 2 * 2 * 2 * 16, generator=g)  # [pre_seq_len, kv_size]
    config = {**json.loads((chatglm3_fp32_model / "config.json").read_text()), "pre_seq_len": 3, "prefix_projection": False}
    for writer, name in ((torch.save, "pytorch_model.bin"), (save_file, "model.safetensors")):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps(config))
        state = {"transformer.prefix_encoder.embedding.weight": prefix}
        writer(state, str(out / name))
        loaded = GLMForCausalLM.from_pretrained(chatglm3_fp32_model, progress=False, adapter=out)
        # the official view: row p = (layer, key/value, kv head, dim); layer i's keys at [i, 0]
        want = prefix.view(3, 2, 2, 2, 16).permute(1, 2, 3, 0, 4)
        with torch.no_grad():
            torch.testing.assert_close(loaded.transformer.prefix_encoder(torch.float32), want)
        by_hand = glmkit.load(chatglm3_fp32_model, progress=False)[0]
        add_prefix(by_hand, 3).embedding.weight.data.copy_(prefix)
        by_hand.eval()
        torch.testing.assert_close(logits(loaded, tokenizer), logits(by_hand, tokenizer), atol=0, rtol=0)
    assert not torch.allclose(logits(loaded, tokenizer), logits(model, tokenizer))


def test_lora_on_transformers_layout_is_written_per_q_k_v_and_fused_back(tmp_path):
    config = HF_GLM.config(hf_config("glm", vocab_size=256))
    model = random_model(config, seed=2)
    model.save_pretrained(tmp_path / "base")
    base = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False)
    torch.manual_seed(0)
    add_lora(base, LoraConfig(target_modules=["query_key_value", "dense"]))
    for m in base.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.weight.data.normal_(0, 0.1)
    base.eval()
    ids = torch.tensor([[5, 17, 42, 9, 88]])
    with torch.no_grad():
        expected = base(ids).logits
    save_adapter(base, tmp_path / "lora")
    config_json = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(config_json["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert tuple(f.get_tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight").shape) == (32, 8)
    assert {k.split("self_attn.")[1] for k in keys if ".layers.0." in k} == {
        f"{p}.lora_{ab}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False, adapter=tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-6, rtol=0)
    # a PEFT adapter on q_proj and v_proj only, with their own A: fused block-diagonally, exactly
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(2):
        for part, rows in (("q_proj", 64), ("v_proj", 32)):
            p = f"base_model.model.model.layers.{i}.self_attn.{part}"
            state[f"{p}.lora_A.weight"] = torch.randn(4, 64, generator=g) * 0.1
            state[f"{p}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.1
    save_file(state, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj", "v_proj"]}))
    fused = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False, adapter=peft_dir)
    plain = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False)
    with torch.no_grad():
        for i, layer in enumerate(plain.transformer.layers):
            w = layer.attention.query_key_value.weight
            p = f"base_model.model.model.layers.{i}.self_attn."
            w[:64] += state[p + "q_proj.lora_B.weight"] @ state[p + "q_proj.lora_A.weight"] * 2
            w[96:] += state[p + "v_proj.lora_B.weight"] @ state[p + "v_proj.lora_A.weight"] * 2
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, atol=1e-5, rtol=0)


def test_glm4_p_tuning_is_peft_prefix_tuning_both_ways(tmp_path):
    config = HF_GLM.config(hf_config("glm", vocab_size=256))
    random_model(config, seed=2).save_pretrained(tmp_path / "base")
    model = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False)
    add_prefix(model, 5).embedding.weight.data.normal_(0, 1.0)
    model.eval()
    ids = torch.tensor([[5, 17, 42, 9, 88]])
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "pt")
    config_json = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "PREFIX_TUNING" and config_json["num_virtual_tokens"] == 5
    assert config_json["num_attention_heads"] == 2 and config_json["token_dim"] == 32  # the KV heads (spec 5.2)
    with safe_open(str(tmp_path / "pt" / "adapter_model.safetensors"), "pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {"prompt_embeddings": (5, 2 * 2 * 32)}  # noqa: SIM118
    reloaded = GLMForCausalLM.from_pretrained(tmp_path / "base", progress=False)
    assert load_adapter(reloaded, tmp_path / "pt") == "PREFIX_TUNING"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=0, rtol=0)
