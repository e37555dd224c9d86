"""The generation engine under the server: requests join and leave the running batch at every step.

    Engine.step():  scheduler.schedule()  ->  runner.prefill / runner.decode  ->  scheduler.finish()

The scheduler is plain Python (no torch), so its policy is tested without a model; the runner owns
the model and its KV cache; the engine ties them together and knows when a request is done. The names
below are imported on first use, so `glmkit.engine.scheduler` (and the server's protocol) need no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmkit.engine.engine import Engine
    from glmkit.engine.request import Request, StepOutput
    from glmkit.engine.scheduler import QueueFull, Scheduler

_EXPORTS = {
    "Engine": "glmkit.engine.engine",
    "QueueFull": "glmkit.engine.scheduler",
    "Request": "glmkit.engine.request",
    "Scheduler": "glmkit.engine.scheduler",
    "StepOutput": "glmkit.engine.request",
}

__all__ = ["Engine", "QueueFull", "Request", "Scheduler", "StepOutput"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
