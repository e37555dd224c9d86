"""`glmkit eval`: GLM-130B's evaluation harness (`evaluation/`) for any glmkit model.

    config.py   task YAML files (the official keys), shipped task names, folders of tasks
    data.py     JSONL / MMLU CSV / C-Eval CSV / text files -> token ids
    scoring.py  answers packed into one sequence per item, scored in one forward pass
    tasks.py    the mul / gen / lm runners and their metrics
    shipped.py  the small bilingual tasks shipped for the demo model, built from its held-out data
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from glmkit.eval.task_config import TaskConfig, TaskConfigError, resolve_tasks
from glmkit.eval.task_data import TaskDataError
from glmkit.eval.tasks import Result, evaluate_task
from glmkit.models.glm import GLM
from glmkit.text.protocol import Tokenizer

__all__ = ["Result", "TaskConfig", "TaskConfigError", "TaskDataError", "evaluate", "format_table", "resolve_tasks"]


def evaluate(model: GLM, tokenizer: Tokenizer | None, configs: Sequence[TaskConfig], *,
             batch_size: int | None = None, limit: int | None = None,
             progress: bool = True) -> tuple[list[Result], dict[str, float]]:
    """Result rows of every task, and the seconds each task took."""
    results, seconds = [], {}
    for config in configs:
        start = time.perf_counter()
        results += evaluate_task(model, tokenizer, config, batch_size=batch_size, limit=limit, progress=progress)
        seconds[config.name] = round(time.perf_counter() - start, 2)
    return results, seconds


def format_table(results: Sequence[Result]) -> str:
    """A plain-text table: task, group, metric, value, n (accuracies in %, perplexities as they are)."""
    header = ("task", "group", "metric", "value", "n")
    rows = [(r.task, r.group, r.metric, f"{r.value:.2f}" if r.value < 1e6 else f"{r.value:.3g}", str(r.n))
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    return "\n".join(lines)
