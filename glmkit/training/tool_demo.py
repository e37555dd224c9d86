"""The GLM-4 demo model's recipe: tool-use data, a value-preserving tokenizer, chat training, evaluation, export.

`build_tool_demo(work_dir, out_dir)` (`glmkit demo build --model glm4-demo`) rebuilds the shipped
`glmkit/assets/glm4-demo` from nothing: the GLM-4 architecture (the THUDM chatglm2 layout: RMSNorm, GQA, SwiGLU,
rotary, untied output layer), GLM-4's tiktoken-format tokenizer and chat format, trained to call four tools.
Stages keep their results under `work_dir` and are skipped when those exist; training resumes from its last
checkpoint (demo.py's conventions, whose helpers this reuses).

Why each choice (see glmkit/text/glm4_bpe.py and glmkit/training/data/tools.py): the model must *copy* argument
values it has never seen from the question into the call, so the tokenizer spells a value with the same ids in
both places and the data holds values and phrasings out for evaluation.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glmkit.eval.tool_use import evaluate_tool_use
from glmkit.families.chatglm2 import FAMILY as THUDM_LAYOUT
from glmkit.pretrained import GLMForCausalLM, load
from glmkit.text.chat_template import GLM4_COMPACT_TOOLS_TEMPLATE
from glmkit.text.glm4_bpe import train_ranks, write_ranks
from glmkit.text.glm4_format import GLM4, GLM4Format
from glmkit.text.glm4_tokenizer import GLM4_SPECIALS, GLM4Tokenizer
from glmkit.training.data import tools as tool_data
from glmkit.training.demo import read_jsonl
from glmkit.training.loop import TrainConfig, sft_batches, train
from glmkit.training.objectives import IGNORE, Example

NAME = "glm4-demo"


@dataclass
class ToolRecipe:
    vocab_size: int  # BPE ranks (the 14 GLM-4 specials come after them)
    model: dict  # THUDM config.json keys of the architecture
    sft: TrainConfig
    train_conversations: int
    heldout_per_kind: dict  # per language: kind -> held-out conversations
    tokenizer_texts: int = 6000  # conversations the BPE is learned from
    notes: dict = field(default_factory=dict)


# Sized for ~40 minutes of training on one CPU core (the build was measured with --threads 1 while another job
# kept the second core busy; with two threads and a busy machine a step took up to 5x longer).
FULL = ToolRecipe(
    vocab_size=3000,
    model=dict(hidden_size=256, num_layers=4, num_attention_heads=8, kv_channels=32, multi_query_group_num=2,
               ffn_hidden_size=768, seq_length=512),
    sft=TrainConfig(steps=4000, batch_size=16, seq_len=256, lr=2e-3, min_lr=1e-4, warmup_steps=100, eval_every=500,
                    eval_batches=4, save_every=100, seed=1),
    train_conversations=80000,
    heldout_per_kind={"call": 100, "direct": 25, "not_offered": 25},
)
TINY = ToolRecipe(
    vocab_size=600,
    model=dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
               ffn_hidden_size=160, seq_length=512),
    sft=TrainConfig(steps=6, batch_size=4, seq_len=256, lr=2e-3, warmup_steps=2, eval_every=3, eval_batches=1,
                    save_every=3),
    train_conversations=300,
    heldout_per_kind={"call": 3, "direct": 1, "not_offered": 1},
    tokenizer_texts=300,
)


def schemas_of(record: dict) -> list[dict] | None:
    return [tool_data.TOOLS[n] for n in record["tools"]] or None


def stage_data(work: Path, recipe: ToolRecipe, seed: int) -> Path:
    out = work / "data"
    if not (out / "summary.json").exists():
        from glmkit.training.data.sources import SOURCES, fetch

        wheel = fetch(SOURCES["babel"])
        tool_data.build_tool_data(out, recipe.train_conversations, recipe.heldout_per_kind, seed, wheel)
        (out / "sources.json").write_text(json.dumps([SOURCES["babel"].record()], indent=2) + "\n", encoding="utf-8")
    return out


def stage_tokenizer(work: Path, data: Path, recipe: ToolRecipe) -> GLM4Tokenizer:
    """Byte-level BPE on rendered training conversations, no token across a value boundary (glm4_bpe)."""
    out = work / "tokenizer"
    if not (out / "tokenizer_config.json").exists():
        records = read_jsonl(data / "train.jsonl")[:recipe.tokenizer_texts]
        compact = GLM4Format(template=GLM4_COMPACT_TOOLS_TEMPLATE)
        texts = [compact.render_text(tool_data.full_messages(r), schemas_of(r), add_generation_prompt=False)
                 .replace("[gMASK]<sop>", "") for r in records]
        for name in GLM4_SPECIALS:
            texts = [t.replace(name, "\n") for t in texts]
        ranks = train_ranks(texts, recipe.vocab_size)
        write_ranks(ranks, out / "tokenizer.model")
        tokenizer = GLM4Tokenizer(out / "tokenizer.model", chat_template=GLM4_COMPACT_TOOLS_TEMPLATE)
        tokenizer.save_pretrained(out)
    return GLM4Tokenizer.from_pretrained(out)


def conversation_example(tokenizer: GLM4Tokenizer, record: dict) -> Example:
    """The whole conversation, causal, loss on every assistant turn (its metadata line included) and on the
    special that ends it (`<|observation|>` after a call, `<|user|>` after an answer): what generation stops on."""
    ids = GLM4.render_ids(tokenizer, tool_data.full_messages(record), schemas_of(record), add_generation_prompt=False)
    ids.append(tokenizer.get_command("<|user|>"))
    assistant = tokenizer.get_command("<|assistant|>")
    specials = set(tokenizer.special_tokens.values())
    labels = [IGNORE] * len(ids)
    inside = False
    for i in range(len(ids) - 1):
        if ids[i] == assistant:
            inside = True
        if inside:
            labels[i] = ids[i + 1]
            if ids[i + 1] in specials:
                inside = False
    return Example(ids, labels, list(range(len(ids))), [0] * len(ids), 0)


def examples_of(tokenizer: GLM4Tokenizer, records: list[dict], max_len: int) -> list[Example]:
    out = [e for e in (conversation_example(tokenizer, r) for r in records) if len(e.input_ids) <= max_len]
    if not out:
        raise ValueError(f"no conversation fits in {max_len} tokens")
    return out


def thudm_config(tokenizer: GLM4Tokenizer, recipe: ToolRecipe) -> dict:
    """config.json in THUDM's glm-4-9b-chat layout, at the recipe's size."""
    s = tokenizer.special_tokens
    return {
        "_name_or_path": NAME, "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True, "fp32_residual_connection": False, "hidden_dropout": 0.0,
        "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "original_rope": True,
        "padded_vocab_size": -(-len(tokenizer) // 64) * 64, "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 1,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "eos_token_id": [s["<|endoftext|>"], s["<|user|>"], s["<|observation|>"]], "pad_token_id": s["<|endoftext|>"],
        **recipe.model,
    }


def new_model(tokenizer: GLM4Tokenizer, recipe: ToolRecipe, seed: int) -> GLMForCausalLM:
    """GPT-2's initialisation: N(0, 0.02), the projections into the residual scaled by 1/sqrt(2 layers)."""
    torch.manual_seed(seed)
    model = GLMForCausalLM(THUDM_LAYOUT.config(thudm_config(tokenizer, recipe)))
    residual_std = 0.02 / (2 * recipe.model["num_layers"]) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, residual_std if name.endswith(("dense.weight", "dense_4h_to_h.weight")) else 0.02)
            elif "bias" in name:
                p.zero_()
    return model


def stage_sft(work: Path, data: Path, tokenizer: GLM4Tokenizer, recipe: ToolRecipe, progress: bool) -> Path:
    out = work / "sft"
    if (out / "model" / "config.json").exists():
        return out / "model"
    config = recipe.sft
    examples = examples_of(tokenizer, read_jsonl(data / "train.jsonl"), config.seq_len)
    held = examples_of(tokenizer, read_jsonl(data / "heldout.jsonl"), config.seq_len)
    model = new_model(tokenizer, recipe, config.seed)
    train(model, sft_batches(examples, config), config, out, sft_batches(held, config), progress=progress)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def evaluate(model_dir: Path, data: Path, progress: bool, limit: int | None = None) -> dict:
    model, tokenizer = load(model_dir, progress=False)
    records = read_jsonl(data / "heldout.jsonl")
    if limit is not None:
        records = random.Random(0).sample(records, min(limit, len(records)))
    return evaluate_tool_use(model, tokenizer, records, tool_data.TOOLS, tool_data.ANSWER_KEYS, progress=progress)


def export(final: Path, out: Path, data: Path, recipe: ToolRecipe, report: dict) -> Path:
    """The shipped directory: fp16 safetensors, the tokenizer (with its chat template), eval.json, a model card."""
    model = GLMForCausalLM.from_pretrained(final, progress=False)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, dtype="float16")
    GLM4Tokenizer.from_pretrained(final).save_pretrained(out)
    meta = {"recipe": asdict(recipe), "evaluation": report,
            "sources": json.loads((data / "sources.json").read_text(encoding="utf-8")),
            "data": json.loads((data / "summary.json").read_text(encoding="utf-8")),
            "parameters": sum(p.numel() for p in model.parameters()),
            "ranks": GLM4Tokenizer.from_pretrained(final).vocab_size,
            "size_bytes": sum(p.stat().st_size for p in out.iterdir())}
    (out / "eval.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(meta), encoding="utf-8")
    return out


METRICS = (("right_tool_valid_args", "right tool, valid arguments"), ("exact_args", "arguments exactly right"),
           ("answer_from_observation", "answer from the observation"), ("direct", "direct answer when no tool fits"))


def accuracy_table(report: dict, keys: list[str] | None = None) -> str:
    """Markdown rows of the metrics per language (or per tool/language)."""
    section = report["per_language"] if keys is None else report["per_tool"]
    rows = ["| | " + " | ".join(label for _, label in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for key in keys or sorted(section):
        cells = []
        for metric, _ in METRICS:
            m = section.get(key, {}).get(metric)
            cells.append(f"{m['accuracy']:.1%} ({m['correct']}/{m['total']})" if m else "-")
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def model_card(meta: dict) -> str:
    """The model card, written from eval.json so that a rebuild keeps it true."""
    report, recipe, m = meta["evaluation"], meta["recipe"], meta["recipe"]["model"]
    timings = report.get("timings_this_run", {})
    per_tool = sorted(report["per_tool"])
    sources = "\n".join(f"| {s['name']} {s['version']} | {s['registry']} | {s['licence']} | {s['used_for']} |"
                        for s in meta["sources"])
    return f"""# glmkit GLM-4 demo model (`{NAME}`)

A small bilingual (English/Chinese) model in the GLM-4 architecture (THUDM's ChatGLM layout: RMSNorm, grouped-query
attention, SwiGLU, rotary, untied output layer) with a GLM-4 tiktoken-format tokenizer and GLM-4's chat format,
trained from nothing by glmkit (`glmkit demo build --model {NAME}`) to call four tools: `get_weather`,
`convert_units`, `calculate`, `get_time`. It calls a tool when one of the offered tools fits (`name` then JSON
arguments), answers from the `<|observation|>` turn, and answers directly otherwise. It is a demo of the pipeline,
not an assistant: outside these tools it knows a few canned replies.

- {meta['parameters']:,} parameters: {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} \
query heads and {m['multi_query_group_num']} key/value groups of {m['kv_channels']}, MLP {m['ffn_hidden_size']}; \
{meta.get('ranks', recipe['vocab_size']):,} BPE ranks + 14 GLM-4 specials, no token across a value boundary (a letter run apart from the \
space or quote before it, one token per Chinese character and per digit); fp16 safetensors, \
{meta['size_bytes'] / 1e6:.1f} MB on disk.
- Training: {recipe['sft']['steps']} steps of {recipe['sft']['batch_size']} conversations from \
{meta['data']['train']:,} generated ones ({meta['data']['places']} cities, {meta['data']['heldout_places']} held out), \
loss on the assistant turns only. {meta.get('build_note') or f"Build time on 2 CPU cores: {sum(timings.values()) / 60:.0f} min."}
- The tokenizer's chat template is GLM-4's with a one-line tools block (`## name(parameter, ...)` per tool, no persona
or schema text); roles, specials, calls and observations are GLM-4's.

## Held-out tool use (greedy; unseen question phrasings and unseen argument values)

{accuracy_table(report)}

Per tool:

{accuracy_table(report, per_tool)}

"right tool, valid arguments": the reply is a call of the expected tool whose arguments validate against its JSON
schema; "arguments exactly right": and equal the expected ones; "answer from the observation": given the call and
the tool's result, the answer repeats the result's values; "direct": no call when no offered tool fits (chit-chat,
or a question for a tool that is not offered).

## Data sources and licences

| source | registry | licence | used for |
|---|---|---|---|
{sources}
| glmkit/training/data/tools.py | - | the package's | question and answer templates, Chinese city names |
"""


def build_tool_demo(work: Path, out: Path, tiny: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run (or resume) every stage; returns the evaluation report."""
    recipe = TINY if tiny else FULL
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, int] = {}
    t = time.time()

    def lap(name: str) -> None:
        timings[name] = round(time.time() - t) - sum(timings.values())

    data = stage_data(work, recipe, seed)
    lap("data_s")
    tokenizer = stage_tokenizer(work, data, recipe)
    lap("tokenizer_s")
    final = stage_sft(work, data, tokenizer, recipe, progress)
    lap("sft_s")
    report = evaluate(final, data, progress)
    lap("eval_s")
    report["timings_this_run"] = timings
    export(final, out, data, recipe, report)
    return report


__all__ = ["FULL", "NAME", "TINY", "ToolRecipe", "build_tool_demo"]
