"""The engine under tensor parallelism: rank 0 schedules, every rank runs each model step.

    rank 0:    HTTP server -> Engine (scheduler) -> BroadcastRunner: send (method, args), then run it
    rank 1..N: follow():     receive (method, args) -> run it on the same ModelRunner state, forever

Every rank holds the same runner state (slots, sampling generators, a pool of the same KV blocks, each rank's
holding its own KV heads; rank 0's scheduler says which blocks each call uses) and computes the same
full logits, so each samples the same token and nothing but the call itself crosses ranks. A failed
broadcast or collective (a dead or hung rank) ends the process with a clear error: the ranks are out
of step and nothing can be retried, and a server that hangs would be worse.
"""

from __future__ import annotations

from typing import Any

import torch

from glmkit.engine.prefix_cache import BLOCK_SIZE
from glmkit.engine.runner import ModelRunner, pool_size
from glmkit.parallel import tp


class BroadcastRunner(ModelRunner):
    """Rank 0's runner: every call goes to the other ranks first."""

    def admit(self, *args: Any) -> None:
        return self._everywhere("admit", args)

    def suspend(self, *args: Any) -> None:
        return self._everywhere("suspend", args)

    def forget(self, *args: Any) -> None:
        return self._everywhere("forget", args)

    def zero_blocks(self, *args: Any) -> None:
        return self._everywhere("zero_blocks", args)

    def copy_blocks(self, *args: Any) -> None:
        return self._everywhere("copy_blocks", args)

    def step(self, *args: Any) -> tuple[list[int | None], list[int | None]]:
        return self._everywhere("step", args)

    def move(self, *args: Any) -> None:
        return self._everywhere("move", args)

    def embed(self, *args: Any) -> list[list[float]]:
        return self._everywhere("embed", args)

    def _everywhere(self, method: str, args: tuple) -> Any:
        try:
            tp.broadcast_object((method, args))
            return getattr(ModelRunner, method)(self, *args)
        except Exception as e:  # noqa: BLE001 (any failure leaves the ranks out of step)
            tp.fail(e)


def follow(model, max_batch: int, max_length: int | None = None, prefix_cache_mb: float = 0,
           kv_cache_mb: float | None = None, kv_dtype: str | None = None) -> None:
    """The other ranks' loop: replay rank 0's runner calls until it sends None (shutdown). The pool settings must be
    rank 0's, so that every rank's pool has the same blocks (each holding its own KV heads')."""
    max_length = max_length or model.config.max_sequence_length
    dtype = getattr(torch, kv_dtype) if kv_dtype else None
    num_blocks, _ = pool_size(model, max_batch, max_length, prefix_cache_mb, kv_cache_mb, dtype)
    runner = ModelRunner(model, max_batch, num_blocks, BLOCK_SIZE, dtype)
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
