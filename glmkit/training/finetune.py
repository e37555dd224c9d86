"""Fine-tuning a chat model: P-Tuning v2, LoRA or full, from one data format and one loop.

Data is JSONL in any of the formats ChatGLM and OpenAI users already have, one record per line:
    {"content": ..., "summary": ...}                       the official P-Tuning example (ADGEN)
    {"prompt": ..., "response": ..., "history": [[q, a], ...]}   the official multi-turn format
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   OpenAI's
Every record becomes `prompt [gMASK] <sop> answer <eop>` in the model's chat format (the one chat()
sends, so the model is trained on what it will see), with the loss on the answer only. The causal families
(ChatGLM2/3, GLM-4: their formats put `[gMASK] sop` first) train `prompt answer </s>` causally, with the loss
on the answer and the end token, as their official P-Tuning v2 and LoRA recipes do (spec 5.1). An OpenAI
conversation gives one example per assistant message, each with the turns before it as history.

The loop is glmkit's training loop (train.py): what a method changes is which parameters train.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glmkit.models.glm import GLM
from glmkit.peft.adapters import LoraConfig, add_lora, add_prefix, save_adapter
from glmkit.text.chat_format import CHATGLM_6B, ChatFormat
from glmkit.text.formats import chat_format_for
from glmkit.text.protocol import Tokenizer
from glmkit.training.loop import Batches, TrainConfig, sft_batches, train
from glmkit.training.objectives import IGNORE, Example, Specials, chat_example

log = logging.getLogger("glmkit.training.finetune")
METHODS = ("ptuning", "lora", "full")
# Learning rates that work when none is given: the official P-Tuning recipe's 2e-2; LoRA's and full
# fine-tuning's usual orders of magnitude.
DEFAULT_LR = {"ptuning": 2e-2, "lora": 1e-3, "full": 1e-4}


class DataError(ValueError):
    """A fine-tuning file that cannot be used, naming the file and line."""


@dataclass
class FinetuneConfig:
    method: str = "lora"
    train: TrainConfig = field(default_factory=TrainConfig)
    max_source_length: int = 512  # prompt tokens kept (the official flag's name); longer prompts lose their start
    max_target_length: int = 256  # answer tokens kept; longer answers are cut, with a warning
    pre_seq_len: int = 128
    prefix_projection: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


def read_chat_records(path: str | Path) -> list[dict]:
    """Chat records {prompt, response, history} from a JSONL file in any supported format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; pass a JSONL file, one chat record per line")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                f"{e.start + 1} of the line); save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
            try:
                records += records_of(item)
            except DataError as e:
                raise DataError(f"{path} line {number}: {e}") from e
    if not records:
        raise DataError(f"{path} holds no training examples; each line must be a JSON object such as "
                        '{"prompt": "...", "response": "..."}')
    return records


def records_of(item: object) -> list[dict]:
    if not isinstance(item, dict):
        raise DataError(f"expected a JSON object, got {type(item).__name__}")
    if "messages" in item:
        return _from_messages(item["messages"])
    if "content" in item and "summary" in item:
        return [_record(item["content"], item["summary"], [])]
    if "prompt" in item and "response" in item:
        return [_record(item["prompt"], item["response"], item.get("history") or [])]
    raise DataError(f"unknown record with keys {sorted(item)}: expected {{content, summary}}, "
                    "{prompt, response[, history]} or {messages: [...]}")


def _record(prompt: object, response: object, history: object) -> dict:
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError("prompt/content and response/summary must be strings")
    if not prompt.strip() or not response.strip():
        raise DataError("empty prompt or response")
    if not isinstance(history, list) or not all(
            isinstance(t, list | tuple) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise DataError("history must be a list of [query, answer] pairs of strings")
    return {"prompt": prompt, "response": response, "history": [list(t) for t in history]}


def _from_messages(messages: object) -> list[dict]:
    """One record per assistant message. ChatGLM-6B has no system slot: a system message is put in
    front of the first user message, as glmkit's OpenAI server does."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError("messages must be a list of {role, content} objects")
    for index, m in enumerate(messages, start=1):
        if not isinstance(m.get("content"), str):
            found = "missing" if m.get("content") is None else type(m["content"]).__name__
            raise DataError(f"message {index} ({m.get('role')!r}): content must be a string, not {found}")
    system = "\n".join(m.get("content", "") for m in messages if m.get("role") == "system")
    turns = [m for m in messages if m.get("role") != "system"]
    records, history = [], []
    query = None
    for m in turns:
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str):
            raise DataError(f"message role must be system, user or assistant with string content, got {role!r}")
        if role == "user":
            if query is not None:
                raise DataError("two user messages in a row; each user message needs an assistant answer")
            query = content if history else CHATGLM_6B.with_system(system, content)
        else:
            if query is None:
                raise DataError("an assistant message without a user message before it")
            records.append(_record(query, content, [list(t) for t in history]))
            history.append([query, content])
            query = None
    if not records:
        raise DataError("a conversation without any assistant message to learn")
    return records


def chat_examples(records: Sequence[dict], tokenizer: Tokenizer, max_source_length: int,
                  max_target_length: int, chat_format: ChatFormat = CHATGLM_6B) -> list[Example]:
    """Encoded examples; overlong prompts keep their end, overlong answers their start (warned once)."""
    specials = Specials(ids=tokenizer.special_ids, eop=tokenizer.eos_token_id)
    examples, long_prompts, long_answers = [], 0, 0
    for r in records:
        prompt_ids = chat_format.prompt_ids(tokenizer, r["prompt"], [tuple(t) for t in r["history"]])
        answer_ids = tokenizer.encode(r["response"], add_special_tokens=False)
        if len(prompt_ids) > max_source_length:  # keep [gMASK] <sop> and the most recent text
            long_prompts += 1
            prompt_ids = prompt_ids[-max_source_length:]
        if len(answer_ids) > max_target_length - 1:  # room for <eop>
            long_answers += 1
            answer_ids = answer_ids[:max_target_length - 1]
        examples.append(chat_example(prompt_ids, answer_ids, specials) if chat_format is CHATGLM_6B
                        else causal_chat_example(prompt_ids, answer_ids, specials.eop))
    if long_answers:
        log.warning("%d of %d answers are longer than --max-target-length %d tokens and were cut; raise it to "
                    "train on them whole", long_answers, len(records), max_target_length)
    if long_prompts:
        log.warning("%d of %d prompts are longer than --max-source-length %d tokens and lost their beginning",
                    long_prompts, len(records), max_source_length)
    return examples


def causal_chat_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], eos: int) -> Example:
    """`prompt answer </s>`, causal, positions from 0: position i predicts token i + 1, so the prompt's last token
    predicts the answer's first, and the answer's last predicts the end token."""
    ids = [*prompt_ids, *answer_ids]
    labels = [IGNORE] * (len(prompt_ids) - 1) + [*answer_ids, eos]
    return Example(ids, labels, list(range(len(ids))), [0] * len(ids), 0)


def prepare(model: GLM, config: FinetuneConfig) -> None:
    """Attach the method's trainable parts and freeze the rest."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {config.method!r}")
    if config.method == "full" and (model.config.quantization_bit or model.config.quantization_embedding_bit):
        raise ValueError("full fine-tuning needs a full-precision model: load it without --quantize, or train "
                         "LoRA or P-Tuning on the quantized base")
    torch.manual_seed(config.train.seed)  # the adapter's initial weights are part of the run
    if config.method == "lora":
        add_lora(model, config.lora)
    elif config.method == "ptuning":
        add_prefix(model, config.pre_seq_len, config.prefix_projection)


def trainable(method: str):
    """Which parameters train, by name."""
    if method == "lora":
        return lambda name: ".lora_" in name
    if method == "ptuning":
        return lambda name: name.startswith("transformer.prefix_encoder.")
    return lambda name: True


def check_fits(model: GLM, config: FinetuneConfig) -> None:
    """The prefix does not count: it holds no positions (as in the official code)."""
    if config.max_source_length < 3 or config.max_target_length < 2:
        raise ValueError("--max-source-length must be at least 3 and --max-target-length at least 2 tokens")
    total = config.max_source_length + config.max_target_length
    if total > model.config.max_sequence_length:
        raise ValueError(f"--max-source-length {config.max_source_length} + --max-target-length "
                         f"{config.max_target_length} = {total} exceeds the model's context "
                         f"{model.config.max_sequence_length}; lower them")


def finetune_settings(config: FinetuneConfig) -> dict:
    """The fine-tuning settings a resumed run must share with the checkpoint (besides the training config)."""
    settings = {"method": config.method, "max_source_length": config.max_source_length,
                "max_target_length": config.max_target_length}
    if config.method == "lora":
        settings["lora"] = asdict(config.lora)
    elif config.method == "ptuning":
        settings.update(pre_seq_len=config.pre_seq_len, prefix_projection=config.prefix_projection)
    return settings


def finetune(model: GLM, tokenizer: Tokenizer, train_records: Sequence[dict], out_dir: Path,
             config: FinetuneConfig, eval_records: Sequence[dict] | None = None, progress: bool = True,
             stop_after: int | None = None, restart: bool = False) -> dict:
    """Train in place (resuming from out_dir's checkpoint, unless `restart`), then write the result to out_dir:
    the adapter alone (LoRA, P-Tuning) or the whole model (full). Returns the final metrics."""
    check_fits(model, config)
    prepare(model, config)
    fmt = chat_format_for(tokenizer)
    examples = chat_examples(train_records, tokenizer, config.max_source_length, config.max_target_length, fmt)
    held: Batches | None = None
    if eval_records:
        held = sft_batches(chat_examples(eval_records, tokenizer, config.max_source_length,
                                         config.max_target_length, fmt), config.train)
    metrics = train(model, sft_batches(examples, config.train), config.train, out_dir, held, progress=progress,
                    trainable=trainable(config.method), stop_after=stop_after, settings=finetune_settings(config),
                    restart=restart)
    if stop_after is not None and metrics["step"] < config.train.steps:
        return metrics  # interrupted on purpose: the checkpoint is the result
    if config.method == "full":
        model.save_pretrained(out_dir, dtype=model.config.torch_dtype)  # the base checkpoint's dtype
        tokenizer.save_pretrained(out_dir)
    else:
        save_adapter(model, out_dir, config.lora if config.method == "lora" else None)
    (out_dir / "finetune.json").write_text(json.dumps({"method": config.method, "metrics": metrics,
                                                       "examples": len(examples)}, indent=2) + "\n")
    return metrics


__all__ = ["DataError", "FinetuneConfig", "METHODS", "chat_examples", "finetune", "read_chat_records"]
