"""Task data files, read into token ids: GLM-130B's JSONL, MMLU / C-Eval CSV, and plain text.

JSONL (GLM-130B's layout, one object per line; `.json` files are read the same way):
    multiple choice  {"inputs_pretokenized": str, "choices_pretokenized": [str, ...], "label": int}
    generation       {"inputs_pretokenized": str, "targets_pretokenized": str | [str, ...]}
    last word (lm)   {"inputs_pretokenized": str, "targets_pretokenized": str}  (" word" after a space)
    documents (lm)   {"text_pretokenized": str}  (the Pile's layout)
Each `X_pretokenized` may be replaced by `X` holding token ids, as in the official files.
CSV: MMLU (question, A, B, C, D, answer; no header) or C-Eval (a header naming id, question, A-D, answer).
Any other file (`.txt`, WikiText's `.tokens`; lm): one document, scored with sliding windows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmkit.text.protocol import Tokenizer

LETTERS = "ABCD"


class TaskDataError(ValueError):
    """A data file that cannot be read; the message names the file and line."""


@dataclass
class ChoiceItem:
    context: list[int]
    choices: list[list[int]]
    label: int
    choice_chars: list[int]  # characters of each choice (tokens when given as ids), for per-char normalisation
    where: str = ""  # file:line, for errors


@dataclass
class GenerationItem:
    context: list[int]
    targets: list[str]  # accepted answers
    where: str = ""


@dataclass
class LastWordItem:
    context: list[int]
    target: list[int]
    where: str = ""


@dataclass
class Document:
    tokens: list[int]
    words: int  # whitespace-separated words: the official perplexity's denominator
    bytes: int  # UTF-8 bytes: the bits-per-byte denominator


class Reader:
    """Turns records into items; `where` ("file:line") prefixes every error."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, where: str) -> list[int]:
        if self.tokenizer is None:
            raise TaskDataError(f"{where}: text fields need a tokenizer; give token ids (`inputs`, `choices`) instead")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def field(self, record: dict, key: str, where: str) -> list[int] | list[list[int]] | str | list[str]:
        """Token ids under `key`, else the text under `key_pretokenized` (returned as text)."""
        if key in record:
            return record[key]
        if f"{key}_pretokenized" in record:
            return record[f"{key}_pretokenized"]
        raise TaskDataError(f"{where}: needs {key + '_pretokenized'!r} (text) or {key!r} (token ids)")

    def ids(self, value, where: str) -> list[int]:
        if isinstance(value, str):
            return self.encode(value, where)
        if isinstance(value, list) and all(isinstance(t, int) for t in value):
            return list(value)
        raise TaskDataError(f"{where}: expected text or a list of token ids, got {type(value).__name__}")

    def choice_item(self, record: dict, where: str) -> ChoiceItem:
        context = self.ids(self.field(record, "inputs", where), where)
        raw = self.field(record, "choices", where)
        if not isinstance(raw, list) or len(raw) < 2:
            raise TaskDataError(f"{where}: choices must be a list of at least two answers")
        choices = [self.ids(c, where) for c in raw]
        if any(not c for c in choices):
            raise TaskDataError(f"{where}: a choice is empty")
        label = record.get("label")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise TaskDataError(f"{where}: label must be the index of the right choice (0..{len(choices) - 1}), "
                                f"got {label!r}")
        chars = [len(c) for c in raw]
        return ChoiceItem(context, choices, label, chars, where)

    def generation_item(self, record: dict, where: str) -> GenerationItem:
        context = self.ids(self.field(record, "inputs", where), where)
        raw = self.field(record, "targets", where)
        targets = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        texts = [t if isinstance(t, str) else self._decode(self.ids(t, where), where) for t in targets]
        return GenerationItem(context, texts, where)

    def last_word_item(self, record: dict, where: str) -> LastWordItem:
        context, target = self.field(record, "inputs", where), self.field(record, "targets", where)
        if isinstance(context, str) and isinstance(target, str):
            context_ids, target_ids = self.split_encode(context, target, where)
        else:
            context_ids, target_ids = self.ids(context, where), self.ids(target, where)
        if not target_ids:
            raise TaskDataError(f"{where}: the target word is empty")
        return LastWordItem(context_ids, target_ids, where)

    def split_encode(self, context: str, target: str, where: str) -> tuple[list[int], list[int]]:
        """The word's tokens as they fall in the running text: encoded alone, a Chinese word would start
        with SentencePiece's word-start piece, which the model never predicts mid-sentence."""
        whole, head = self.encode(context + target, where), self.encode(context, where)
        if whole[:len(head)] == head:
            return head, whole[len(head):]
        return head, self.encode(target, where)  # a piece spans the boundary: fall back to the word alone

    def _decode(self, ids: list[int], where: str) -> str:
        if self.tokenizer is None:
            raise TaskDataError(f"{where}: token-id targets need a tokenizer to compare answers as text")
        return self.tokenizer.decode(ids)


def json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for each non-empty line; a `.json` file holding one list is accepted too."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, record in enumerate(records):
            yield _checked(record, f"{path}: item {i}")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            yield _checked(record, f"{path}:{number}")


def _checked(record, where: str) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise TaskDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def csv_subject(path: Path) -> str:
    """MMLU and C-Eval name files after their subject: `college_physics_test.csv` -> "college physics"."""
    stem = path.stem
    for split in ("_test", "_val", "_dev"):
        stem = stem.removesuffix(split)
    return stem.replace("_", " ")


Shot = tuple[list[str], str]  # ([question, A, B, C, D], answer letter)


def csv_prompt(question: list[str], subject: str, chinese: bool, shots: Sequence[Shot] = ()) -> str:
    """MMLU's prompt (Hendrycks et al.; C-Eval's in Chinese): the heading, solved examples, the question.

    Each question is followed by its lettered options and `Answer:` (`答案：`), with the letter filled
    in for the examples."""
    if chinese:
        head, answer = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。", "答案："
    else:
        head, answer = f"The following are multiple choice questions (with answers) about {subject}.", "Answer:"

    def block(fields: list[str], letter: str) -> str:
        options = [f"{x}. {option}" for x, option in zip(LETTERS, fields[1:], strict=True)]
        return "\n".join([fields[0], *options, f"{answer}{'' if chinese else ' '}{letter}".rstrip()])

    return "\n\n".join([head, *(block(fields, letter) for fields, letter in shots), block(question, "")])


def dev_examples(path: Path, count: int) -> list[Shot]:
    """The first `count` rows of the subject's dev file, where MMLU and C-Eval keep them:
    `data/test/x_test.csv` -> `data/dev/x_dev.csv` (C-Eval: `val/x_val.csv` -> `dev/x_dev.csv`)."""
    dev = path.parent.parent / "dev" / f"{csv_subject(path).replace(' ', '_')}_dev.csv"
    if not dev.is_file():
        raise TaskDataError(f"{path}: few-shot needs the subject's dev file {dev} (MMLU's and C-Eval's layout)")
    shots = [(fields, answer) for _, fields, answer, _ in csv_rows(dev)][:count]
    if len(shots) < count:
        raise TaskDataError(f"{dev}: {len(shots)} examples, fewer than few-shot {count}")
    return shots


def csv_rows(path: Path) -> Iterator[tuple[str, list[str], str, bool]]:
    """("file:line", [question, A, B, C, D], answer letter, is C-Eval) per row."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TaskDataError(f"{path}: empty CSV file")
        columns = [c.strip() for c in header]
        ceval = "question" in columns and all(letter in columns for letter in LETTERS)
        if ceval and "answer" not in columns:
            raise TaskDataError(f"{path}: no 'answer' column (C-Eval's test split has no answers; use the val split)")
        rows = reader if ceval else _prepend(header, reader)
        for row in rows:
            where = f"{path}:{reader.line_num}"
            if ceval:
                record = dict(zip(columns, row, strict=False))
                fields = [record.get(k, "") for k in ("question", *LETTERS)]
                answer = record.get("answer", "")
            else:
                if len(row) != 6:
                    raise TaskDataError(f"{where}: MMLU rows have 6 columns (question, A, B, C, D, answer), "
                                        f"this one has {len(row)}")
                fields, answer = row[:5], row[5]
            if answer.strip() not in LETTERS:
                raise TaskDataError(f"{where}: answer must be one of A, B, C, D, got {answer!r}")
            yield where, fields, answer.strip(), ceval


def _prepend(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def read_choice_items(path: Path, reader: Reader, csv_choices: str = "letters",
                      few_shot: int = 0) -> list[ChoiceItem]:
    if path.suffix != ".csv":
        return [reader.choice_item(record, where) for where, record in json_records(path)]
    shots = dev_examples(path, few_shot) if few_shot else []
    items = []
    for where, fields, answer, ceval in csv_rows(path):
        prompt = csv_prompt(fields, csv_subject(path), chinese=ceval, shots=shots)
        choices = list(LETTERS) if csv_choices == "letters" else fields[1:]
        record = {"inputs_pretokenized": prompt, "choices_pretokenized": choices, "label": LETTERS.index(answer)}
        items.append(reader.choice_item(record, where))
    return items


def document(text: str, tokens: list[int]) -> Document:
    return Document(tokens, len(text.split()), len(text.encode("utf-8")))


def read_documents(path: Path, reader: Reader) -> list[Document]:
    """A text file is one document; a JSONL file (the Pile's layout) holds one per line under
    `text_pretokenized` (or `text`, as text or as token ids with the text beside them)."""
    if path.suffix not in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise TaskDataError(f"{path}: empty text file")
        return [document(text, reader.encode(text, str(path)))]
    out = []
    for where, record in json_records(path):
        text = record.get("text_pretokenized", record.get("text"))
        if not isinstance(text, str):
            raise TaskDataError(f"{where}: needs the document's text under 'text_pretokenized' or 'text'")
        tokens = record["text"] if isinstance(record.get("text"), list) else reader.encode(text, where)
        if tokens:
            out.append(document(text, tokens))
    return out


def is_document_file(path: Path) -> bool:
    """Whether an lm file holds documents to score (text, or JSONL with `text`) rather than last-word items."""
    if path.suffix not in (".json", ".jsonl"):
        return True
    first = next(json_records(path), None)
    return first is not None and ("text" in first[1] or "text_pretokenized" in first[1])
