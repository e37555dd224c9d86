"""Task configs: GLM-130B's YAML files (`evaluation/configs.py`), read without its dataclass library.

Keys are the official ones; `-` and `_` are interchangeable (`micro-batch-size` = `micro_batch_size`),
as the official loader allows. Official keys glmkit does not implement (beam search, custom task
modules) are reported and ignored; any other unknown key is an error, so a typo never passes silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_TASKS_DIR = Path(__file__).resolve().parents[1] / "assets" / "tasks"

TASK_TYPES = ("mul", "gen", "lm")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")  # what the default pattern picks up
DEFAULT_PATTERN = {"all": "**/*"}
# Official keys that select machinery glmkit does not have: generation here is greedy, tasks are built in.
IGNORED_KEYS = {"module", "sampling_strategy", "num_beams", "length_penalty", "no_repeat_ngram_size",
                "min_gen_length", "no_tokenized", "use_multitask_encoding", "unidirectional", "deterministic"}
METRICS = {
    "mul": ("accuracy", "accuracy_per_token", "accuracy_per_char"),
    "gen": ("em", "f1"),
    "lm": ("ppl_word", "ppl_token", "bpb", "last_word_accuracy"),
}
# The official metric names, mapped to glmkit's.
METRIC_ALIASES = {"accuracy": "accuracy", "em": "em", "f1": "f1", "ppl": "ppl_word"}


class TaskConfigError(ValueError):
    """A task YAML that cannot be used as it is; the message names the file and says what to change."""


@dataclass
class TaskConfig:
    name: str
    type: str  # mul | gen | lm
    path: Path  # a data file, or a folder searched with file_pattern
    source: Path  # the YAML file (relative paths in it are relative to its folder)
    file_pattern: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PATTERN))  # group -> glob
    metrics: list[str] = field(default_factory=list)  # empty: all of the type's metrics
    use_task_mask: bool | None = None  # [gMASK] instead of [MASK]; None: the type's default
    max_seq_length: int | None = None  # None: the model's context (at most 2048, as the official default)
    micro_batch_size: int = 8
    max_gen_length: int = 128  # gen: new tokens at most
    generation_length: int = 256  # lm: tokens scored per sliding window after the first
    csv_choices: str = "letters"  # MMLU/C-Eval CSV: score the letters A-D, or the option texts ("text")
    few_shot: int = 0  # MMLU/C-Eval CSV: solved examples from the subject's dev file before each question

    @property
    def gmask(self) -> bool:
        """Multiple choice uses [MASK] (GLM-130B's setting); generation and language modelling [gMASK]."""
        return self.type != "mul" if self.use_task_mask is None else self.use_task_mask

    def groups(self) -> dict[str, list[Path]]:
        """Data files per group, sorted; a folder is searched with each group's pattern."""
        if self.path.is_file():
            return {"all": [self.path]}
        if not self.path.is_dir():
            raise TaskConfigError(f"{self.source}: data path {self.path} does not exist (relative paths are "
                                  "relative to the YAML file's folder)")
        groups = {}
        for group, pattern in self.file_pattern.items():
            # A pattern of one's own may name any file (WikiText's wiki.test.tokens); the default takes known kinds.
            files = sorted(p for p in self.path.glob(pattern) if p.is_file() and not p.name.startswith(".")
                           and (self.file_pattern != DEFAULT_PATTERN or p.suffix in DATA_SUFFIXES))
            if not files:
                raise TaskConfigError(f"{self.source}: no data files match {pattern!r} under {self.path}")
            groups[group] = files
        return groups


def _normalise_keys(raw: dict, source: Path) -> dict:
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise TaskConfigError(f"{source}: keys must be strings, got {key!r}")
        out[key.replace("-", "_").lower()] = value
    return out


def _file_pattern(value, source: Path) -> dict[str, str]:
    if isinstance(value, str):
        return {"all": value}
    if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise TaskConfigError(f"{source}: file-pattern must be a glob string or a mapping of group name to glob")


def _metrics(value, task_type: str, source: Path) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise TaskConfigError(f"{source}: metrics must be a list of names")
    out = []
    for name in names:
        metric = METRIC_ALIASES.get(str(name).lower(), str(name).lower())
        if metric not in METRICS[task_type]:
            raise TaskConfigError(f"{source}: metric {name!r} is not one of a {task_type!r} task's: "
                                  f"{', '.join(METRICS[task_type])}")
        out.append(metric)
    return out


def parse_task(raw: object, source: Path, data_path: Path | None = None) -> TaskConfig:
    """A TaskConfig from a parsed YAML document; a relative `path` is taken from `data_path` (GLM-130B's
    DATA_PATH) when given, else from the YAML file's folder."""
    if not isinstance(raw, dict):
        raise TaskConfigError(f"{source}: a task file must be a YAML mapping (name, type, path, ...)")
    keys = _normalise_keys(raw, source)
    for required in ("name", "type", "path"):
        if required not in keys:
            raise TaskConfigError(f"{source}: missing key {required!r} (a task needs name, type and path)")
    if keys["type"] not in TASK_TYPES:
        raise TaskConfigError(f"{source}: unknown task type {keys['type']!r}; use one of {', '.join(TASK_TYPES)} "
                              "(multiple choice, generation, language modelling)")
    ignored = sorted(k for k in keys if k in IGNORED_KEYS)
    if ignored:
        print(f"glmkit eval: {source.name}: ignoring {', '.join(ignored)} (generation is greedy; tasks are built in)",
              file=sys.stderr)
    known = {f for f in TaskConfig.__dataclass_fields__ if f != "source"}
    unknown = sorted(k for k in keys if k not in known and k not in IGNORED_KEYS)
    if unknown:
        raise TaskConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values = {k: v for k, v in keys.items() if k in known}
    values["name"] = str(values["name"])
    values["path"] = (data_path or source.parent) / Path(str(values["path"])).expanduser()  # absolute stays
    if "file_pattern" in values:
        values["file_pattern"] = _file_pattern(values["file_pattern"], source)
    values["metrics"] = _metrics(values.get("metrics", []), keys["type"], source)
    for key in ("max_seq_length", "micro_batch_size", "max_gen_length", "generation_length"):
        if key in values and values[key] is not None and (not isinstance(values[key], int) or values[key] < 1):
            raise TaskConfigError(f"{source}: {key.replace('_', '-')} must be a positive integer, got {values[key]!r}")
    if not isinstance(values.get("few_shot", 0), int) or values.get("few_shot", 0) < 0:
        raise TaskConfigError(f"{source}: few-shot must be a whole number of examples, got {values['few_shot']!r}")
    if values.get("csv_choices", "letters") not in ("letters", "text"):
        raise TaskConfigError(f"{source}: csv-choices must be 'letters' or 'text'")
    return TaskConfig(source=source, **values)


def load_task(path: Path, data_path: Path | None = None) -> TaskConfig:
    import yaml  # only the eval command needs it

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TaskConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_task(raw, path, data_path)


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TASKS_DIR.glob("*.yaml"))


def resolve_tasks(specs: list[str], data_path: Path | None = None) -> list[TaskConfig]:
    """Task configs from YAML files, folders of YAML files and shipped task names; none given: every shipped task.

    `data_path` roots the relative data paths of the user's YAML files (not of the shipped ones)."""
    if not specs:
        specs = shipped_task_names()
    configs = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not files:
                raise TaskConfigError(f"{path}: folder holds no .yaml task files")
            configs += [load_task(f, data_path) for f in files]
        elif path.is_file():
            configs.append(load_task(path, data_path))
        elif (SHIPPED_TASKS_DIR / f"{spec}.yaml").is_file():
            configs.append(load_task(SHIPPED_TASKS_DIR / f"{spec}.yaml"))
        else:
            raise TaskConfigError(f"{spec}: no such task file or folder, and not a shipped task "
                                  f"({', '.join(shipped_task_names()) or 'none shipped'})")
    return configs
