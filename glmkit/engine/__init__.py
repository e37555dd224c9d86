"""The generation engine under the server: requests join and leave the running batch at every step.

    Engine.step():  scheduler.schedule()  ->  runner.prefill / runner.decode  ->  scheduler.finish()

The scheduler is plain Python (no torch), so its policy is tested without a model; the runner owns
the model and its KV cache; the engine ties them together and knows when a request is done.
"""

from glmkit.engine.engine import Engine
from glmkit.engine.request import Request, StepOutput
from glmkit.engine.scheduler import QueueFull, Scheduler

__all__ = ["Engine", "QueueFull", "Request", "Scheduler", "StepOutput"]
