"""GLM-130B: its architecture as options of the core model, its icetk ids, positions and masks, and its
official SwissArmyTransformer checkpoints.

The SAT checkpoints here are written by this file's own slicing, from the published layout (per-head
QKV rows, [x1_rank; x2_rank] GeGLU rows, row-parallel columns, vocab-parallel embeddings), not by
glmkit's tp_layout, so a wrong merge cannot hide behind a matching wrong split. The reference
forward pass is written from SwissArmyTransformer's glm130B_model.py, independently of glmkit.models.glm."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from glmkit import GLMForCausalLM, load
from glmkit.checkpoints.sat import SatCheckpointError, convert_sat
from glmkit.cli import main
from glmkit.models.config import GLMConfig, preset
from glmkit.models.glm import MLP, RotaryEmbedding
from glmkit.models.positions import PREFIX_LM_1D, SpecialIds, model_layout

from sat_files import glm130b_state, write_sat
from tiny import EOP, EOS, GMASK, MASK, SOP, tiny_config, tiny_glm130b_config

SPECIAL = SpecialIds(bos=SOP, mask=MASK, gmask=GMASK, pad=0)
MiB = 2**20


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.fixture(scope="module")
def sat(tmp_path_factory):
    """(config, fp16 state, {world: SAT folder}, {world: converted glmkit folder})."""
    config = tiny_glm130b_config()
    state = glm130b_state(config)
    root = tmp_path_factory.mktemp("sat")
    sources, converted = {}, {}
    for world in (1, 2):
        sources[world] = write_sat(state, config, root / f"mp{world}", world)
        converted[world] = convert_sat(sources[world], root / f"glmkit-mp{world}", config, progress=False)
    return config, state, sources, converted


# ----- the reference: SwissArmyTransformer's GLM-130B forward pass, from its source


def official_layout(seq: list[int], mask_position: int, gmask: bool, generated: int = 0):
    """GLM-130B generate.py's get_masks_and_position_ids: `seq` ends with <sop>."""
    length = len(seq) + generated
    allowed = torch.ones(length, length).tril()
    allowed[:, : len(seq) - 1] = 1
    position_ids = torch.arange(length)
    if not gmask:
        position_ids[len(seq) - 1:] = mask_position
    return position_ids, allowed < 0.5


def sat_rotary_table(dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAT 0.2.x RotaryEmbedding: inv_freq.half(), positions in fp16, einsum in fp16, cos/sin in fp16."""
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half()
    t = torch.arange(length, dtype=torch.float16)
    freqs = (t.float()[:, None] * inv_freq.float()[None, :]).half()  # an fp16 product: exact, then rounded
    emb = torch.cat([freqs, freqs], dim=-1).float()
    return emb.cos().half(), emb.sin().half()


def sat_reference_logits(state, config: GLMConfig, ids: list[int], position_ids, blocked) -> torch.Tensor:
    w = {k: v.float() for k, v in state.items()}
    heads, dim, seq = config.num_attention_heads, config.head_dim, len(ids)
    alpha = (2 * config.num_layers) ** 0.5

    def norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], w[f"{prefix}.weight"], w[f"{prefix}.bias"], config.layernorm_epsilon)

    def linear(x, prefix):
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    cos_table, sin_table = sat_rotary_table(dim, config.max_sequence_length)
    cos, sin = cos_table.float()[position_ids][:, None], sin_table.float()[position_ids][:, None]  # [S, 1, D]

    def rotate(x):  # [S, H, D], NeoX rotate_half
        return x * cos + torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], dim=-1) * sin

    h = w["transformer.word_embeddings.weight"][torch.tensor(ids)]
    for layer in range(config.num_layers):
        p = f"transformer.layers.{layer}"
        a = norm(h, f"{p}.input_layernorm")
        qkv = linear(a, f"{p}.attention.query_key_value").view(seq, heads, 3 * dim)  # per head: q, k, v
        q, k, v = rotate(qkv[..., :dim]), rotate(qkv[..., dim:2 * dim]), qkv[..., 2 * dim:]
        coeff = layer + 1.0
        scores = torch.einsum("qhd,khd->hqk", q / (math.sqrt(dim) * coeff), k)
        probs = (scores.masked_fill(blocked, -10000.0) * coeff).softmax(dim=-1)
        context = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, heads * dim)
        h = a * alpha + linear(context, f"{p}.attention.dense")
        m = norm(h, f"{p}.post_attention_layernorm")
        x1, x2 = linear(m, f"{p}.mlp.dense_h_to_4h").chunk(2, dim=-1)
        h = m * alpha + linear(x1 * erf_gelu(x2), f"{p}.mlp.dense_4h_to_h")
    return norm(h, "transformer.final_layernorm") @ w["transformer.word_embeddings.weight"].T


# ----- architecture


def test_geglu_mlp_gates_the_first_half_with_the_exact_erf_gelu():
    config = tiny_glm130b_config(hidden_size=8, inner_hidden_size=6)
    torch.manual_seed(0)
    mlp = MLP(config)
    assert mlp.dense_h_to_4h.weight.shape == (12, 8)  # [x1; x2], each inner_hidden_size wide
    x = torch.randn(5, 8) * 3  # large enough that tanh-GELU and erf-GELU differ
    up = x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias
    expected = (up[:, :6] * erf_gelu(up[:, 6:])) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)
    tanh_gelu = up[:, :6] * F.gelu(up[:, 6:], approximate="tanh")
    assert not torch.allclose(tanh_gelu @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias, mlp(x), atol=1e-6)


def test_fp16_rotary_table_is_sat_table_bit_for_bit():
    positions = torch.arange(2048)[None]
    cos, sin = RotaryEmbedding(128, 10000.0, fp16_table=True)(positions, torch.float32)
    want_cos, want_sin = sat_rotary_table(128, 2048)
    assert torch.equal(cos[0, :, 0], want_cos.float()) and torch.equal(sin[0, :, 0], want_sin.float())
    fp32_cos, _ = RotaryEmbedding(128, 10000.0)(positions, torch.float32)
    assert (fp32_cos[0, :, 0] - want_cos.float()).abs().max() > 0.01  # the fp16 angles are off by up to 1 ulp of 2048


def test_glm130b_preset_is_the_released_model():
    c = preset("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.head_dim) == (70, 12288, 96, 128)
    assert (c.inner_hidden_size, c.vocab_size, c.max_sequence_length) == (32768, 150528, 2048)
    assert c.residual_alpha == math.sqrt(140)
    assert (c.mlp_type, c.position_encoding_2d, c.rotary_table_fp16) == ("geglu", False, True)
    assert (c.mask_token_id, c.gmask_token_id, c.smask_token_id) == (150000, 150001, 150002)
    assert (c.bos_token_id, c.eos_token_id, c.text_eos_token_id, c.pad_token_id) == (150004, 150005, 20002, 0)
    assert c.stop_token_ids == (150005, 20002)
    assert preset("glm-130b", num_layers=2, hidden_size=64, num_attention_heads=4).residual_alpha == 2.0


def test_config_round_trips_and_chatglm_configs_gain_no_keys(tmp_path):
    c = tiny_glm130b_config()
    c.save(tmp_path)
    assert GLMConfig.from_json_file(tmp_path / "config.json").to_dict() == c.to_dict()
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rotary_table_fp16"] is True and written["smask_token_id"] == c.smask_token_id
    chatglm = tiny_config().to_dict()
    assert not {"rotary_table_fp16", "smask_token_id", "text_eos_token_id"} & set(chatglm)


# ----- positions and masks derived from ids (generate.py's rules)


def blocked_from(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in row] for row in rows])


def test_mask_prompt_freezes_positions_at_the_mask():
    ids = torch.tensor([[5, 6, MASK, 7, SOP, 8, 9]])
    positions, blocked = model_layout(ids, SPECIAL, PREFIX_LM_1D)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 2, 2, 2]
    assert torch.equal(blocked[0, 0], blocked_from([
        "....xxx",
        "....xxx",
        "....xxx",
        "....xxx",
        ".....xx",
        "......x",
        ".......",
    ]))


def test_gmask_prompt_keeps_counting_and_mask_wins_over_gmask():
    positions, blocked = model_layout(torch.tensor([[5, 6, 7, GMASK, SOP, 8, 9]]), SPECIAL, PREFIX_LM_1D)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert blocked[0, 0, :, :4].any().item() is False and blocked[0, 0, 4].tolist() == [False] * 5 + [True] * 2
    positions, _ = model_layout(torch.tensor([[5, MASK, 6, GMASK, SOP, 8]]), SPECIAL, PREFIX_LM_1D)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 1, 1]  # generate.py: "[MASK]" in the text wins


def test_context_runs_to_the_last_sop():
    positions, blocked = model_layout(torch.tensor([[5, MASK, SOP, 6, SOP, 7]]), SPECIAL, PREFIX_LM_1D)
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 1, 1]
    assert not blocked[0, 0, 0, :4].any() and blocked[0, 0, 0, 4:].all()


# ----- SAT checkpoints


@pytest.mark.parametrize("world", [1, 2])
def test_converted_checkpoint_holds_the_released_weights(sat, world):
    config, state, _, converted = sat
    model = GLMForCausalLM.from_pretrained(converted[world], progress=False, dtype="float16")
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()


@pytest.mark.parametrize(("prompt", "mask_position", "gmask"), [
    ([9, 8, 7, 6, 5, 4, 3, 200, 100, GMASK, SOP], 9, True),
    ([9, 8, 7, MASK, 6, 5, 4, 3, 200, 100, SOP], 3, False),
], ids=["gmask", "mask"])
def test_logits_match_the_sat_reference_at_mp1_and_mp2(sat, prompt, mask_position, gmask):
    config, state, _, converted = sat
    position_ids, blocked = official_layout(prompt, mask_position, gmask)
    want = sat_reference_logits(state, config, prompt, position_ids, blocked)
    logits = {}
    for world in (1, 2):
        model = GLMForCausalLM.from_pretrained(converted[world], progress=False)
        with torch.no_grad():
            logits[world] = model(torch.tensor([prompt])).logits[0]  # positions and mask derived from the ids
    assert torch.equal(logits[1], logits[2])
    torch.testing.assert_close(logits[1], want, rtol=1e-4, atol=1e-4)


def test_fp16_rotary_table_moves_the_logits_of_a_long_prompt(sat):
    config, state, _, converted = sat
    model = GLMForCausalLM.from_pretrained(converted[2], progress=False)
    prompt = [(7 * i) % 200 + 3 for i in range(80)] + [GMASK, SOP]
    with torch.no_grad():
        table = model(torch.tensor([prompt])).logits[0]
        model.transformer.rotary.fp16_table = False
        exact = model(torch.tensor([prompt])).logits[0]
    position_ids, blocked = official_layout(prompt, 80, gmask=True)
    torch.testing.assert_close(table, sat_reference_logits(state, config, prompt, position_ids, blocked),
                               rtol=1e-4, atol=1e-4)
    assert (table - exact).abs().max() > 1e-2


def greedy_by_recomputation(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cached_greedy_decoding_equals_full_recomputation(sat):
    _, _, _, converted = sat
    model = GLMForCausalLM.from_pretrained(converted[2], progress=False)
    prompts = [[5, 6, 7, 8, 9, GMASK, SOP], [10, 11, MASK, 12, 13, 14, 15, 16, SOP]]
    batch = torch.tensor([[0, 0, *prompts[0]], prompts[1]])  # left-padded: decoded together, rows apart
    cached = model.generate(batch, max_new_tokens=10, eos_token_id=[-1])[:, -10:].tolist()
    for prompt, row in zip(prompts, cached, strict=True):
        assert not {SOP, MASK, GMASK, EOP, EOS} & set(row), "pick another prompt: the test needs plain tokens"
        assert row == greedy_by_recomputation(model, prompt, 10)
        assert len(set(row)) > 3  # not a degenerate repetition


def test_generation_stops_at_the_text_eos_as_at_eop(sat):
    _, _, _, converted = sat
    model = GLMForCausalLM.from_pretrained(converted[1], progress=False)
    prompt = [5, 6, 7, 8, 9, GMASK, SOP]
    first = greedy_by_recomputation(model, prompt, 1)[0]
    assert model.generate(torch.tensor([prompt]), max_new_tokens=4).shape[1] == len(prompt) + 4
    model.config.text_eos_token_id = first  # as if the model had written `</s>` first
    assert model.generate(torch.tensor([prompt]), max_new_tokens=4).tolist() == [prompt + [first]]


MEASURE = """
import json, sys
from glmkit.checkpoints.sat import convert_sat, expected_shapes
from tiny import tiny_glm130b_config

def high_water_mark():  # VmHWM belongs to this exec'd process; ru_maxrss would include the parent's
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

config = tiny_glm130b_config(**json.loads(sys.argv[3]))
expected_shapes(tiny_glm130b_config())  # torch's meta-device machinery loads ~70 MB of code once: not the model's
base = high_water_mark()
convert_sat(sys.argv[1], sys.argv[2], config, max_shard_size="16MB", progress=False)
print(json.dumps({"base": base, "peak": high_water_mark()}))
"""


@pytest.mark.slow
def test_conversion_streams_holding_about_one_model_never_two(tmp_path):
    sizes = dict(vocab_size=8000, hidden_size=1024, num_attention_heads=16, inner_hidden_size=2736, num_layers=7)
    config = tiny_glm130b_config(**sizes)
    state = glm130b_state(config)
    model_bytes = sum(t.numel() * 2 for t in state.values())  # ~190 MB of fp16, no tensor over 16 MB
    write_sat(state, config, tmp_path / "src", world=2)
    del state
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "src"), str(tmp_path / "out"),
                          json.dumps(sizes)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    m = json.loads(out.stdout)
    grown = m["peak"] - m["base"]
    # The memory-mapped rank files count once (file pages), plus the 16 MB shard being merged and the same
    # shard mapped for writing; merging the model in memory on top of reading the ranks would double it.
    assert grown < 1.25 * model_bytes, f"conversion grew RSS by {grown / MiB:.0f} MiB for {model_bytes / MiB:.0f} MiB"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 4


# ----- bad input


@pytest.fixture
def sat_copy(sat, tmp_path):
    config, _, sources, _ = sat
    return config, shutil.copytree(sources[2], tmp_path / "src")


def test_missing_latest_or_iteration_or_rank_is_reported(sat_copy, tmp_path):
    config, src = sat_copy
    with pytest.raises(SatCheckpointError, match="no `latest` file .*pass its parent"):
        convert_sat(src / "49300", tmp_path / "out", config, progress=False)
    (src / "latest").write_text("50000\n")
    with pytest.raises(SatCheckpointError, match="names iteration '50000'"):
        convert_sat(src, tmp_path / "out", config, progress=False)
    (src / "latest").write_text("49300")
    (src / "49300" / "mp_rank_01_model_states.pt").unlink()  # the last rank: nothing counts the ranks
    with pytest.raises(SatCheckpointError, match=r"or rank files are missing: 1 found"):
        convert_sat(src, tmp_path / "out", config, progress=False)
    (src / "49300" / "mp_rank_00_model_states.pt").rename(src / "49300" / "mp_rank_01_model_states.pt")
    with pytest.raises(SatCheckpointError, match="lacks mp_rank_00_model_states.pt"):
        convert_sat(src, tmp_path / "out", config, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_sat(tmp_path / "nowhere", tmp_path / "out", config, progress=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"hidden_size": 32}, "--hidden-size is 32, the checkpoint says 64"),
    ({"inner_hidden_size": 48}, "--inner-hidden-size is 48, the checkpoint says 96"),
    ({"vocab_size": 512}, "--vocab-size is 512, the checkpoint says 256"),
    ({"num_layers": 3}, "the checkpoint has 2 layers but --num-layers is 3"),
    ({"num_attention_heads": 1}, "--num-attention-heads 1 cannot be split over the checkpoint's 2"),
])
def test_sizes_that_disagree_name_the_argument(sat, tmp_path, overrides, message):
    _, _, sources, _ = sat
    with pytest.raises(SatCheckpointError, match=message):
        convert_sat(sources[2], tmp_path / "out", tiny_glm130b_config(**overrides), progress=False)
    assert not (tmp_path / "out").exists(), "nothing may be written before every size is checked"


def test_missing_parameter_is_reported(sat_copy, tmp_path):
    config, src = sat_copy
    for rank in (0, 1):
        path = src / "49300" / f"mp_rank_{rank:02d}_model_states.pt"
        data = torch.load(path, weights_only=True)
        del data["module"]["transformer.layers.1.mlp.dense_4h_to_h.bias"]
        torch.save(data, path)
    with pytest.raises(SatCheckpointError, match="lacks transformer.layers.1.mlp.dense_4h_to_h.bias"):
        convert_sat(src, tmp_path / "out", config, progress=False)


# ----- the command line


def test_cli_converts_with_the_official_arguments(tmp_path, capsys):
    sizes = dict(num_layers=1, hidden_size=16, inner_hidden_size=32, num_attention_heads=2, vocab_size=150528,
                 max_sequence_length=64)
    config = tiny_glm130b_config(**sizes, mask_token_id=150000, gmask_token_id=150001, smask_token_id=150002,
                                 bos_token_id=150004, eos_token_id=150005, text_eos_token_id=20002)
    state = glm130b_state(config)
    write_sat(state, config, tmp_path / "src", world=2)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    assert main(["convert", "--from", "sat", str(tmp_path / "src"), str(tmp_path / "out"), *flags,
                 "--layernorm-order", "post"]) == 0
    model = GLMForCausalLM.from_pretrained(tmp_path / "out", progress=False)
    assert model.config.to_dict() == GLMConfig.from_dict({**config.to_dict(), "torch_dtype": "float16"}).to_dict()
    with torch.no_grad():
        logits = model(torch.tensor([[20100, 20200, 150001, 150004]])).logits
    assert logits.shape == (1, 4, 150528) and torch.isfinite(logits).all()
    assert main(["info", str(tmp_path / "out")]) == 0
    assert "GLM-130B: 1 layers" in (out := capsys.readouterr().out) and "GeGLU MLP 32" in out
    assert "1D prefix-LM positions, NeoX rotary" in out


def test_tokenizer_travels_with_the_model_and_must_give_its_ids(tmp_path, tokenizer_dir, tokenizer):
    """icetk layout: the text tokenizer's ids shifted past 20000 image ids."""
    ids = dict(mask_token_id=tokenizer.mask_token_id + 20000, gmask_token_id=tokenizer.gmask_token_id + 20000,
               bos_token_id=tokenizer.bos_token_id + 20000, eos_token_id=tokenizer.eos_token_id + 20000,
               smask_token_id=None, text_eos_token_id=None)
    config = tiny_glm130b_config(vocab_size=21248, num_layers=1, **ids)
    write_sat(glm130b_state(config), config, tmp_path / "src", world=2)
    out = convert_sat(tmp_path / "src", tmp_path / "out", config, tokenizer=tokenizer_dir / "ice_text.model",
                      progress=False)
    _, loaded = load(out)  # load() also checks that the tokenizer's ids fit the model
    assert loaded.num_image_tokens == 20000
    assert loaded.encode("hello")[-2:] == [config.gmask_token_id, config.bos_token_id]
    wrong = tiny_glm130b_config(vocab_size=21248, num_layers=1, **{**ids, "bos_token_id": ids["bos_token_id"] + 1})
    with pytest.raises(SatCheckpointError, match="does not belong to this model"):
        convert_sat(tmp_path / "src", tmp_path / "out2", wrong, tokenizer=tokenizer_dir / "ice_text.model",
                    progress=False)


def test_cli_asks_for_the_sizes_a_sat_checkpoint_lacks(tmp_path, capsys):
    assert main(["convert", "--from", "sat", str(tmp_path), str(tmp_path / "out"), "--num-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "give --hidden-size" in err and "--preset glm-130b" in err
    assert main(["convert", "--from", "sat", str(tmp_path), str(tmp_path / "out"), "--preset", "glm-130b",
                 "--layernorm-order", "pre"]) == 2
    assert "post-LN" in capsys.readouterr().err
