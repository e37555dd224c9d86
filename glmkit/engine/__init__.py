"""The generation engine under the server: requests join and leave the running batch at every step.

    Engine.step():  scheduler.schedule()  ->  runner.step (one forward pass)  ->  scheduler.encoded / finish()

The scheduler is plain Python (no torch), so its policy is tested without a model: who runs, which KV-cache
blocks each request holds (blocks.py, prefix_cache.py), what to preempt. The runner owns the model and the
paged KV cache (glmkit.models.paged); the engine ties them together and knows when a request is done. The names
below are imported on first use, so `glmkit.engine.scheduler` (and the server's protocol) need no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmkit.lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
