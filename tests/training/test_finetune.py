"""Fine-tuning: data formats and their errors, LoRA and P-Tuning v2 adapters (also on quantized
bases), saving alone in PEFT's layout, loading, merging, resuming, and teaching the shipped demo
model a skill it lacks."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

from glmkit import GLMForCausalLM, load
from glmkit.engine import Engine
from glmkit.eval.skills import exact_match
from glmkit.generation.generate import stream_tokens
from glmkit.generation.sampling import SamplingParams
from glmkit.peft.adapters import (
    AdapterError,
    LoraConfig,
    LoRALinear,
    add_lora,
    add_prefix,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from glmkit.training.data.compare import compare_records
from glmkit.training.finetune import DataError, FinetuneConfig, chat_examples, finetune, read_chat_records
from glmkit.training.loop import TrainConfig
from glmkit.training.objectives import IGNORE

from tiny import write_chat_model


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo():
    return load(progress=False)


def fresh_demo():
    return load(progress=False)[0]


def logits_of(model, tokenizer, text="Which is larger, 37 or 52?"):
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        return model(ids).logits[0, -1]


def quick_config(method, steps=6, **kwargs):
    train = TrainConfig(steps=steps, batch_size=4, lr=1e-2 if method == "ptuning" else 3e-3, min_lr=1e-4,
                        warmup_steps=0, eval_every=1000, save_every=2, seq_len=96)
    return FinetuneConfig(method=method, train=train, max_source_length=64, max_target_length=32, pre_seq_len=4,
                          **kwargs)


# ----- data


def test_all_three_formats_become_chat_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"content": "类型#裙", "summary": "一条裙子。"},
        {"prompt": "And Japan?", "response": "Tokyo.", "history": [["Capital of France?", "Paris."]]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4."}]},
    ])
    records = read_chat_records(path)
    assert records[0] == {"prompt": "类型#裙", "response": "一条裙子。", "history": []}
    assert records[1]["history"] == [["Capital of France?", "Paris."]]
    # one example per assistant message; the system text goes before the first user message (as the server does)
    assert records[2] == {"prompt": "Be brief.\n\nHi", "response": "Hello!", "history": []}
    assert records[3] == {"prompt": "2+2?", "response": "4.", "history": [["Be brief.\n\nHi", "Hello!"]]}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "response": ', "line 2: not valid JSON"),
    ('{"question": "a", "answer": "b"}', "line 2: unknown record with keys ['answer', 'question']"),
    ('{"prompt": "a", "response": ""}', "line 2: empty prompt or response"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: a conversation without any assistant message"),
    ('{"prompt": "a", "response": "b", "history": [["only one"]]}', "line 2: history must be a list of"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_a_malformed_line_is_reported_with_its_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_chat_records(path)


def test_an_empty_dataset_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match="holds no training examples"):
        read_chat_records(path)


def test_long_answers_are_cut_with_a_warning_and_labels_cover_answers_only(demo, caplog):
    _, tokenizer = demo
    long_answer = "Paris is the capital of France. " * 20
    records = [{"prompt": "Capital of France?", "response": long_answer, "history": []},
               {"prompt": "Hi", "response": "Hello.", "history": []}]
    with caplog.at_level(logging.WARNING, logger="glmkit.training.finetune"):
        examples = chat_examples(records, tokenizer, max_source_length=64, max_target_length=16)
    assert "1 of 2 answers are longer than --max-target-length 16" in caplog.text
    cut, short = examples
    answer = [t for t in cut.labels if t != IGNORE]
    assert len(answer) == 16 and answer[-1] == tokenizer.eos_token_id
    prompt_ids = tokenizer.encode("Hi")
    assert short.input_ids[:len(prompt_ids)] == prompt_ids  # the chat() prompt, unchanged
    assert [t for t in short.labels if t != IGNORE] == tokenizer.encode("Hello.", add_special_tokens=False) + [
        tokenizer.eos_token_id]


# ----- LoRA


def test_a_fresh_lora_adapter_changes_nothing_and_training_moves_only_its_weights(demo, tmp_path):
    model, tokenizer = fresh_demo(), demo[1]
    before = logits_of(model, tokenizer)
    targets = ["query_key_value", "dense_4h_to_h"]
    wrapped = add_lora(model, LoraConfig(r=4, target_modules=targets))
    assert len(wrapped) == 2 * model.config.num_layers
    torch.testing.assert_close(logits_of(model, tokenizer), before)  # B starts at zero

    model = fresh_demo()
    base = {n: p.clone() for n, p in model.named_parameters()}
    finetune(model, tokenizer, compare_records("train", 16), tmp_path / "lora",
             quick_config("lora", lora=LoraConfig(r=4, target_modules=targets)), progress=False)
    trained = dict(model.named_parameters())
    assert sum(".lora_" in n for n in trained) == 2 * len(wrapped)
    for name, p in trained.items():
        if ".lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    assert not torch.allclose(logits_of(model, tokenizer), before)


def test_lora_adapter_is_saved_alone_in_peft_layout_and_reloads_exactly(demo, tmp_path):
    model, tokenizer = fresh_demo(), demo[1]
    finetune(model, tokenizer, compare_records("train", 16), tmp_path / "lora", quick_config("lora"), progress=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert config["target_modules"] == ["query_key_value"] and config["task_type"] == "CAUSAL_LM"
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layers = model.config.num_layers
    assert keys == {f"base_model.model.transformer.layers.{i}.attention.query_key_value.lora_{ab}.weight"
                    for i in range(layers) for ab in "AB"}
    reloaded = GLMForCausalLM.from_pretrained(model.name_or_path, progress=False, adapter=tmp_path / "lora")
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(model, tokenizer))


def test_merging_lora_folds_it_into_the_weights(demo, tmp_path):
    model, tokenizer = fresh_demo(), demo[1]
    finetune(model, tokenizer, compare_records("train", 16), tmp_path / "lora", quick_config("lora"), progress=False)
    expected = logits_of(model, tokenizer)
    merge_adapter(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(logits_of(model, tokenizer), expected, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    merged = GLMForCausalLM.from_pretrained(tmp_path / "merged", progress=False)
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_trains_on_a_quantized_base(demo, tmp_path, bits):
    tokenizer = demo[1]
    model = load(quantize=bits, progress=False)[0]
    int_weights = model.transformer.layers[0].attention.query_key_value.weight.clone()
    config = quick_config("lora", steps=8, lora=LoraConfig(target_modules=["query_key_value", "dense_h_to_4h"]))
    finetune(model, tokenizer, compare_records("train", 16), tmp_path / "q", config, progress=False)
    first = model.transformer.layers[0].attention.query_key_value
    assert isinstance(first, LoRALinear)
    assert torch.equal(first.base_layer.weight, int_weights)  # the base stays frozen
    # the gradient reached the first layer's adapter through every frozen quantized layer above it
    assert first.lora_B.weight.abs().sum() > 0
    reloaded = GLMForCausalLM.from_pretrained(model.name_or_path, progress=False, quantize=bits, adapter=tmp_path / "q")
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(model, tokenizer))


# ----- P-Tuning v2


def test_p_tuning_adapter_reloads_and_merges_into_a_model_directory(demo, tmp_path):
    model, tokenizer = fresh_demo(), demo[1]
    base_logits = logits_of(model, tokenizer)
    finetune(model, tokenizer, compare_records("train", 16), tmp_path / "pt", quick_config("ptuning"), progress=False)
    expected = logits_of(model, tokenizer)
    assert not torch.allclose(expected, base_logits)
    with safe_open(str(tmp_path / "pt" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {"transformer.prefix_encoder.embedding.weight"}  # the official name
        assert f.get_tensor("transformer.prefix_encoder.embedding.weight").shape == (4, 2 * 4 * 256)
    reloaded = GLMForCausalLM.from_pretrained(model.name_or_path, progress=False, adapter=tmp_path / "pt")
    torch.testing.assert_close(logits_of(reloaded, tokenizer), expected)
    merge_adapter(reloaded).save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["pre_seq_len"] == 4 and config["prefix_projection"] is False
    torch.testing.assert_close(logits_of(GLMForCausalLM.from_pretrained(tmp_path / "merged", progress=False),
                                         tokenizer), expected)


def test_an_official_p_tuning_checkpoint_loads_as_an_adapter(demo, tmp_path):
    """ptuning/main.py saves config.json (with pre_seq_len) and pytorch_model.bin holding only the prefix."""
    model, tokenizer = fresh_demo(), demo[1]
    add_prefix(model, 3)
    torch.manual_seed(1)
    model.transformer.prefix_encoder.embedding.weight.data.normal_(0, 0.5)
    expected = logits_of(model, tokenizer)
    out = tmp_path / "checkpoint-3000"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**model.config.to_dict(), "pre_seq_len": 3}))
    torch.save({"transformer.prefix_encoder.embedding.weight": model.transformer.prefix_encoder.embedding.weight},
               out / "pytorch_model.bin")
    reloaded = GLMForCausalLM.from_pretrained(model.name_or_path, progress=False, adapter=out)
    torch.testing.assert_close(logits_of(reloaded, tokenizer), expected)


def test_p_tuning_prefix_serves_through_continuous_batching(demo):
    model, tokenizer = fresh_demo(), demo[1]
    add_prefix(model, 5)
    torch.manual_seed(0)
    model.transformer.prefix_encoder.embedding.weight.data.normal_(0, 1.0)
    model.eval()
    prompts = [tokenizer.encode(q) for q in ("Which is larger, 37 or 52?", "你好", "What is 3 plus 4?")]
    params = SamplingParams(max_new_tokens=8)
    alone = [[int(t[0]) for t in stream_tokens(model, [p], params)] for p in prompts]
    engine = Engine(model, max_batch=3)
    requests = [engine.add_request(p, params) for p in prompts]
    got = {r.request_id: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id].append(out.token_id)
    assert [got[r.request_id] for r in requests] == alone


# ----- errors, resume


def test_an_adapter_for_another_base_model_is_refused_by_name(demo, tmp_path, tokenizer):
    other = GLMForCausalLM.from_pretrained(write_chat_model(tmp_path / "other", tokenizer), progress=False)
    add_lora(other, LoraConfig())
    save_adapter(other, tmp_path / "other-lora")
    with pytest.raises(AdapterError, match="trained on a different base model: num_layers 2 .this model: 4."):
        load_adapter(fresh_demo(), tmp_path / "other-lora")
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(fresh_demo(), tmp_path / "nowhere")


def test_a_truncated_adapter_file_is_a_clear_error(demo, tmp_path):
    model = fresh_demo()
    add_lora(model, LoraConfig())
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(fresh_demo(), tmp_path / "a")


def test_an_interrupted_run_resumes_to_the_same_adapter(demo, tmp_path):
    tokenizer = demo[1]
    records = compare_records("train", 16)
    straight = fresh_demo()
    finetune(straight, tokenizer, records, tmp_path / "straight", quick_config("lora", steps=6), progress=False)
    resumed = fresh_demo()
    finetune(resumed, tokenizer, records, tmp_path / "resumed", quick_config("lora", steps=6), progress=False,
             stop_after=3)
    resumed = fresh_demo()  # a new process: only the checkpoint on disk carries over
    finetune(resumed, tokenizer, records, tmp_path / "resumed", quick_config("lora", steps=6), progress=False)
    torch.testing.assert_close(logits_of(resumed, tokenizer), logits_of(straight, tokenizer), rtol=0, atol=1e-6)


# ----- the promise: a new skill


@pytest.mark.slow
def test_lora_teaches_the_demo_model_a_skill_it_lacks(demo, tmp_path):
    model, tokenizer = fresh_demo(), demo[1]
    heldout = compare_records("heldout", 20)
    assert exact_match(model, tokenizer, heldout, progress=False)["all"]["accuracy"] < 0.1
    config = quick_config("lora", steps=300, lora=LoraConfig(target_modules=["query_key_value", "dense",
                                                                             "dense_h_to_4h", "dense_4h_to_h"]))
    config.train.batch_size = 16
    finetune(model, tokenizer, compare_records("train", 600), tmp_path / "skill", config, progress=False)
    report = exact_match(model, tokenizer, heldout, progress=False)
    # Measured on the shipped model: 95% (en) / 100% (zh) after 300 steps; the margin absorbs CPU float differences.
    assert report["compare/en"]["accuracy"] >= 0.85 and report["compare/zh"]["accuracy"] >= 0.85


# ----- the commands


def run_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "glmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_finetune_generate_merge_and_eval_gen_commands(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                                 {"role": "assistant", "content": r["response"]}]}
                                                   for r in compare_records("train", 20)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"content": r["prompt"], "summary": r["response"]}
                                               for r in compare_records("heldout", 3)])
    done = run_cli("finetune", "--data", train, "--eval", dev, "--method", "lora", "--output", tmp_path / "lora",
                   "--steps", 4, "--batch-size", 4, "--eval-every", 2)
    assert done.returncode == 0, done.stderr
    assert "adapter written to" in done.stdout and (tmp_path / "lora" / "adapter_model.safetensors").exists()
    assert "eval_loss" in (tmp_path / "lora" / "log.jsonl").read_text()

    with_adapter = run_cli("generate", "--adapter", tmp_path / "lora", "--max-new-tokens", 8, "Which is larger, 3 or 5?")
    merge = run_cli("merge", "--adapter", tmp_path / "lora", "--output", tmp_path / "merged")
    assert merge.returncode == 0, merge.stderr
    merged = run_cli("generate", "--model", tmp_path / "merged", "--max-new-tokens", 8, "Which is larger, 3 or 5?")
    assert with_adapter.returncode == merged.returncode == 0
    assert with_adapter.stdout == merged.stdout and with_adapter.stdout.strip()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "float16"

    scores = run_cli("eval-gen", "--adapter", tmp_path / "lora", "--data", dev, "--json", "--predictions",
                     tmp_path / "pred.jsonl")
    assert scores.returncode == 0, scores.stderr
    result = json.loads(scores.stdout.strip().splitlines()[-1])
    assert set(result) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "count"} and result["count"] == 6
    predictions = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["label"] for p in predictions] == [json.loads(line)["summary"] for line in dev.read_text().splitlines()]


def test_commands_report_bad_input_clearly(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{oops"])
    done = run_cli("finetune", "--data", bad, "--method", "lora", "--output", tmp_path / "o", "--steps", 1)
    assert done.returncode == 2 and "bad.jsonl line 2: not valid JSON" in done.stderr
    done = run_cli("generate", "--adapter", tmp_path / "missing", "hi")
    assert done.returncode == 2 and "adapter directory" in done.stderr
    full = run_cli("finetune", "--data", write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "response": "b"}]),
                   "--method", "full", "--quantize", "4", "--output", tmp_path / "o", "--steps", 1)
    assert full.returncode == 2 and "full fine-tuning needs a full-precision model" in full.stderr
