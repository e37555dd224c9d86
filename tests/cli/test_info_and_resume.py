"""`glmkit info` verifies what it describes and names each family's real architecture; weights with NaN or Inf are
refused at load; resuming refuses other settings, --force-restart starts over (issue 19, items 9, 10, 12)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit.checkpoints.files import CheckpointError
from glmkit.checkpoints.hf import load_model
from glmkit.cli import build_parser, main
from glmkit.cli.models import count_in_units
from glmkit.cli.training import discard_stage
from glmkit.models.positions import SpecialIds
from glmkit.training.loop import ResumeError, TrainConfig, pretrain_batches, train
from glmkit.training.objectives import Specials

from layouts import hf_config, hf_state, thudm_config, thudm_state, write_checkpoint
from tiny import EOP, GMASK, MASK, PAD, SOP, random_model, tiny_config

SPECIALS = Specials(ids=SpecialIds(bos=SOP, mask=MASK, gmask=GMASK, pad=PAD), eop=EOP)

DEMO = Path(glmkit.__file__).parent / "assets" / "demo-model"


def info(path: Path, capsys) -> tuple[int, str, str]:
    rc = main(["info", str(path)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_info_counts_parameters_in_readable_units(capsys):
    rc, out, _ = info(DEMO, capsys)
    assert rc == 0 and "parameters   4,961,792 (5.0 M)" in out
    assert [count_in_units(n) for n in (950, 4_961_792, 6_173_286_400, 130_000_000_000)] == [
        "950", "5.0 M", "6.2 B", "130.0 B"]


@pytest.mark.parametrize("layout, words", [
    ("demo", ["ChatGLM-6B", "4 heads of 64", "GELU MLP 1024", "LayerNorm, DeepNorm", "2D prefix-LM positions",
              "NeoX rotary"]),
    ("chatglm2", ["ChatGLM2-6B", "4 heads (2 KV heads, grouped-query) of 16", "SwiGLU MLP 96", "RMSNorm, pre-norm",
                  "causal positions", "interleaved rotary on 0.5 of each head"]),
    ("glm4", ["GLM-4-0414", "SwiGLU", "RMSNorm, pre-norm with sandwich norms", "causal positions",
              "interleaved rotary"]),
])
def test_info_names_each_familys_real_architecture(tmp_path, capsys, layout, words):
    if layout == "demo":
        directory = DEMO
    elif layout == "chatglm2":
        directory = write_checkpoint(tmp_path / layout, thudm_state(), thudm_config())
    else:
        directory = write_checkpoint(tmp_path / layout, hf_state(sandwich=True), hf_config("glm4"))
    rc, out, _ = info(directory, capsys)
    line = next(line for line in out.splitlines() if line.startswith("architecture"))
    assert rc == 0 and all(word in line for word in words), line
    if layout != "demo":
        assert "1D" not in line and "2D" not in line and "GELU" not in line


def corrupted(tmp_path: Path, how: str) -> Path:
    directory = Path(shutil.copytree(DEMO, tmp_path / "model"))
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "trailing bytes":
        weights.write_bytes(data + b"\0" * 64)
    elif how == "short header":
        weights.write_bytes(data[:4])
    else:  # a header that no longer fits the file: its length field says more than there is
        weights.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    return directory


@pytest.mark.parametrize("how, message", [("truncated", "is truncated: it has"), ("trailing bytes", "is corrupt"),
                                          ("short header", "is truncated"), ("huge header", "is truncated")])
def test_info_flags_a_truncated_or_corrupt_weight_file(tmp_path, capsys, how, message):
    rc, out, err = info(corrupted(tmp_path, how), capsys)
    assert rc == 2 and message in err and "re-download it" in err and err.count("\n") == 1
    assert "size on disk" not in out


def test_info_flags_a_truncated_bin_file(tmp_path, capsys):
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(DEMO / "config.json", directory)
    torch.save(load_file(str(DEMO / "model.safetensors")), directory / "pytorch_model.bin")
    data = (directory / "pytorch_model.bin").read_bytes()
    (directory / "pytorch_model.bin").write_bytes(data[: len(data) - 200])
    rc, _, err = info(directory, capsys)
    assert rc == 2 and "truncated or corrupt" in err and "miniz" not in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_at_load_by_name(tmp_path, capsys, bad):
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    state[name][3, 5] = bad
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name} holds 1 NaN or Inf value"):
        load_model(tmp_path / "m", progress=False)
    assert main(["generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "1", "hi"]) == 2
    assert name in capsys.readouterr().err


def test_huge_finite_weights_whose_sum_overflows_still_load(tmp_path):
    """The check's fast path sums each slice in fp32; finite values whose sum overflows must not be refused."""
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    state[name][:2] = 3.0e38  # fp32's max is 3.4e38: the row sums to inf, every value is finite
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_model(tmp_path / "m", progress=False)
    assert loaded.state_dict()[name][0, 0] == torch.tensor(3.0e38)


def tiny_run(tmp_path: Path, **overrides):
    """Pre-training batches for the tiny model over a few id-only documents."""
    config = TrainConfig(**{**dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, eval_every=100, save_every=1,
                                   seq_len=24), **overrides})
    docs = [[10 + (i * 7 + j * 3) % 200 for j in range(40)] for i in range(4)]
    return config, pretrain_batches(docs, SPECIALS, config)


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path):
    config, batches = tiny_run(tmp_path)
    train(random_model(tiny_config()), batches, config, tmp_path, stop_after=2, progress=False)
    other, batches = tiny_run(tmp_path, seed=99)
    other.lr = 0.5
    with pytest.raises(ResumeError, match=r"lr 0\.001 \(now 0\.5\).*seed 0 \(now 99\).*--force-restart"):
        train(random_model(tiny_config()), batches, other, tmp_path, progress=False)
    # What does not change the weights may differ; the same settings resume.
    same, batches = tiny_run(tmp_path, eval_every=50, save_every=2)
    assert train(random_model(tiny_config()), batches, same, tmp_path, progress=False)["step"] == 4
    # restart: step 0 again, with the new settings, and the old log gone.
    assert train(random_model(tiny_config()), batches, other, tmp_path, progress=False, stop_after=1,
                 restart=True)["step"] == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["meta"]["config"]["lr"] == 0.5


def test_finetune_refuses_other_settings_and_force_restart_starts_over(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    command = ["finetune", "--data", str(data), "--output", str(tmp_path / "out"), "--steps", "1", "--batch-size", "2"]
    assert main(command) == 0
    capsys.readouterr()
    assert main([*command, "--lr", "0.5", "--seed", "99"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.001 (now 0.5)" in err and "seed 0 (now 99)" in err and err.count("\n") == 1
    assert main([*command, "--lora-r", "4"]) == 2  # fine-tuning's own settings count too
    assert "'r': 8" in capsys.readouterr().err
    assert main([*command, "--lr", "0.5", "--seed", "99", "--force-restart"]) == 0
    meta = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["meta"]
    assert meta["config"]["lr"] == 0.5 and meta["config"]["seed"] == 99


def test_train_force_restart_discards_the_stage(tmp_path):
    args = build_parser().parse_args(["train", "sft", "--data", "d", "--tokenizer", "t", "--out", "o",
                                      "--force-restart"])
    assert args.force_restart is True
    stage = tmp_path / "sft"
    (stage / "model").mkdir(parents=True)
    for name in ("checkpoint.pt", "log.jsonl", "model/config.json"):
        (stage / name).write_text("x")
    discard_stage(stage)
    assert sorted(p.name for p in stage.iterdir()) == []


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) of every runnable subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from walk(sub, (*path, name))


def test_every_help_shows_every_default():
    """Each option with a default other than None and False says it in --help (switches are off by default)."""
    missing = []
    for path, parser in walk(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
                continue
            shown = formatter._expand_help(action) if action.help else ""
            if "default" not in shown or str(action.default) not in shown:
                missing.append(f"glmkit {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing
    for path, parser in walk(build_parser()):
        if path == ("generate",):
            text = " ".join(parser.format_help().split())
            # the model's own defaults, per family (--temperature, --top-p, --top-k, --max-length are None)
            for shown in ("0.95 for ChatGLM-6B, 0.8 for ChatGLM2/ChatGLM3/GLM-4",
                          "0.7 for ChatGLM-6B, 0.8 for ChatGLM2/ChatGLM3/GLM-4", "50 for every family",
                          "2048 for ChatGLM-6B, 8192 for ChatGLM2/ChatGLM3/GLM-4"):
                assert shown in text, shown
        if path == ("serve",):
            assert "(default: 8000)" in " ".join(parser.format_help().split())
