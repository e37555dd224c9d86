"""A user's mistake in a file or a flag is one line on stderr and exit code 2, never a traceback (issue 19, item 8):
refused pickles, malformed configs and adapter configs, bad fine-tuning data, broken checkpoints, unusable devices."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import glmkit
from glmkit.cli import main

from layouts import thudm_config, thudm_state, write_checkpoint

DEMO = Path(glmkit.__file__).parent / "assets" / "demo-model"
GLMKIT = [sys.executable, "-m", "glmkit"]


class Payload:
    """A custom class in a pickle: what glmkit must refuse to unpickle (it could as well run code)."""

    def __init__(self) -> None:
        self.value = 1


def pickle_payload(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"transformer.word_embeddings.weight": Payload()}, path)
    return path


def run(argv: list[str], capsys) -> str:
    """glmkit ARGV in this process: exit code 2 and one line on stderr, which is returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("glmkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def model_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DEMO, tmp_path / "model"))


def chat_data(tmp_path: Path, n: int = 8) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(n)))
    return path


def assert_refused(err: str, path: Path) -> None:
    assert "will not unpickle" in err and "Payload" in err
    assert "weights_only" not in err and "add_safe_globals" not in err  # not torch's advice to turn safety off
    if path is not None:
        assert str(path) in err


def test_pickled_objects_in_bin_weights_are_refused_by_info_and_load(tmp_path, capsys):
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(DEMO / "config.json", directory)
    weights = pickle_payload(directory / "pytorch_model.bin")
    assert_refused(run(["info", str(directory)], capsys), weights)
    assert_refused(run(["generate", "--model", str(directory), "hi"], capsys), weights)


def test_pickled_objects_in_a_ptuning_checkpoint_are_refused(tmp_path, capsys):
    adapter = tmp_path / "ptuning"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps({"pre_seq_len": 4}))
    pickle_payload(adapter / "pytorch_model.bin")
    assert_refused(run(["generate", "--adapter", str(adapter), "hi"], capsys), None)


def test_pickled_objects_in_a_raw_sat_checkpoint_are_refused(tmp_path, capsys):
    src = tmp_path / "sat"
    (src / "1").mkdir(parents=True)
    (src / "latest").write_text("1")
    rank = pickle_payload(src / "1" / "mp_rank_00_model_states.pt")
    err = run(["convert", "--from", "sat", str(src), str(tmp_path / "out"), "--preset", "glm-130b"], capsys)
    assert_refused(err, rank)


def test_pickled_objects_in_a_training_checkpoint_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = pickle_payload(out / "checkpoint.pt")
    err = run(["finetune", "--data", str(chat_data(tmp_path)), "--output", str(out), "--steps", "1"], capsys)
    assert_refused(err, checkpoint)


def test_a_truncated_training_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "optimizer": {}, "step": 1, "meta": {}}, out / "checkpoint.pt")
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])
    err = run(["finetune", "--data", str(chat_data(tmp_path)), "--output", str(out), "--steps", "1"], capsys)
    assert "truncated or corrupt" in err and "--force-restart" in err and "miniz" not in err


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds a list, not an object"),
    ('"chatglm"', "holds a str, not an object"),
])
def test_a_config_json_that_is_not_an_object(tmp_path, capsys, text, message):
    directory = model_copy(tmp_path)
    (directory / "config.json").write_text(text)
    assert message in run(["info", str(directory)], capsys)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", "256", 'hidden_size must be an integer, not the string "256"'),
    ("layernorm_epsilon", "1e-5", "layernorm_epsilon must be a number"),
    ("position_encoding_2d", "yes", "position_encoding_2d must be true or false"),
    ("torch_dtype", 16, "torch_dtype must be a string, not 16"),
    ("pre_seq_len", [4], "pre_seq_len must be an integer or null"),
])
def test_wrong_value_types_name_the_key_and_the_type(tmp_path, capsys, key, value, message):
    directory = model_copy(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, key: value}))
    err = run(["info", str(directory)], capsys)
    assert message in err and "config.json" in err


def test_a_renamed_key_of_a_later_family_is_named_as_the_file_has_it(tmp_path, capsys):
    directory = write_checkpoint(tmp_path / "glm", thudm_state(), thudm_config(ffn_hidden_size="96"))
    assert "ffn_hidden_size (glmkit's inner_hidden_size) must be an integer" in run(["info", str(directory)], capsys)


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "LORA", "lora_alpha": 32, "target_modules": ["query_key_value"]}, "has no 'r'"),
    ({"peft_type": "LORA", "r": "8", "lora_alpha": 32, "target_modules": ["query_key_value"]},
     "r must be a positive integer"),
    ([{"r": 8}], "holds a list, not an object"),
])
def test_a_malformed_adapter_config(tmp_path, capsys, config, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(adapter / "adapter_model.safetensors"))
    err = run(["generate", "--adapter", str(adapter), "hi"], capsys)
    assert message in err and "adapter_config.json" in err


def test_finetune_data_a_directory(tmp_path, capsys):
    assert "is a directory; pass a JSONL file" in run(["finetune", "--data", str(tmp_path), "--output", "o"], capsys)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "system", "content": 5}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     "message 1 ('system'): content must be a string, not int"),
    ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}], "message 1 ('user'): content must be a string, not list"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2 ('assistant'): content must be a string, "
                                                                  "not missing"),
])
def test_finetune_data_with_non_string_content(tmp_path, capsys, messages, message):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"messages": messages}) + "\n")
    err = run(["finetune", "--data", str(data), "--output", str(tmp_path / "o")], capsys)
    assert f"{data} line 2: {message}" in err


def test_finetune_data_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n\n{"prompt": "\xff\xfe", "response": "b"}\n')
    err = run(["finetune", "--data", str(data), "--output", str(tmp_path / "o")], capsys)
    assert f"{data} line 3: not UTF-8 text (byte 0xff" in err


def test_cuda_on_a_cpu_only_torch(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = run(["generate", "--device", "cuda", "hi"], capsys)
    assert "--device cuda" in err and "use --device cpu" in err


@pytest.mark.parametrize("device", ["foo", "cuda:x"])
def test_an_unknown_device(capsys, device):
    assert "is not a device PyTorch knows" in run(["generate", "--device", device, "hi"], capsys)


def test_through_the_real_command(tmp_path):
    """The same as a subprocess sees it: exit code 2 and exactly one line on stderr."""
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(DEMO / "config.json", directory)
    pickle_payload(directory / "pytorch_model.bin")
    result = subprocess.run([*GLMKIT, "info", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "will not unpickle" in result.stderr
