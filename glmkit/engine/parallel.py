"""The engine under tensor parallelism: rank 0 schedules, every rank runs each model step.

    rank 0:    HTTP server -> Engine (scheduler) -> BroadcastRunner: send (method, args), then run it
    rank 1..N: follow():     receive (method, args) -> run it on the same ModelRunner state, forever

Every rank holds the same runner state (slots, lengths, sampling generators, the prefix cache's table of blocks,
each rank's holding its own KV heads) and computes the same
full logits, so each samples the same token and nothing but the call itself crosses ranks. A failed
broadcast or collective (a dead or hung rank) ends the process with a clear error: the ranks are out
of step and nothing can be retried, and a server that hangs would be worse.
"""

from __future__ import annotations

from typing import Any

from glmkit.engine.runner import ModelRunner
from glmkit.parallel import tp


class BroadcastRunner(ModelRunner):
    """Rank 0's runner: every call goes to the other ranks first."""

    def prefill(self, *args: Any) -> int:
        return self._everywhere("prefill", args)

    def decode(self, *args: Any) -> list[int | None]:
        return self._everywhere("decode", args)

    def move(self, *args: Any) -> None:
        return self._everywhere("move", args)

    def keep(self, *args: Any) -> None:
        return self._everywhere("keep", args)

    def embed(self, *args: Any) -> list[list[float]]:
        return self._everywhere("embed", args)

    def _everywhere(self, method: str, args: tuple) -> Any:
        try:
            tp.broadcast_object((method, args))
            return getattr(ModelRunner, method)(self, *args)
        except Exception as e:  # noqa: BLE001 (any failure leaves the ranks out of step)
            tp.fail(e)


def follow(model, max_batch: int, max_length: int | None = None, prefix_cache_mb: float = 0) -> None:
    """The other ranks' loop: replay rank 0's runner calls until it sends None (shutdown). prefix_cache_mb must be
    rank 0's: each rank's runner then looks up, inserts and evicts the same prefix blocks (its own KV heads')."""
    runner = ModelRunner(model, max_batch, max_length or model.config.max_sequence_length, prefix_cache_mb)
    while True:
        try:
            command = tp.broadcast_object(None)
            if command is None:
                return
            method, args = command
            getattr(runner, method)(*args)
        except Exception as e:  # noqa: BLE001
            tp.fail(e)


def stop_followers() -> None:
    tp.broadcast_object(None)
