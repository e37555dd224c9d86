"""Automatic prefix caching: the keys and values of prompt blocks that earlier requests computed, for later
requests whose prompts start the same way (a shared system prompt, the earlier turns of a conversation).

A prompt is cut into blocks of `block_size` tokens. Block i's key is a hash of block i-1's key and block i's
tokens, so a key names the whole prefix up to the end of its block, not just the block's own tokens:

    ids      [ t0 .. t15 | t16 .. t31 | t32 .. t47 | t48 t49 ]      (block_size 16; the tail is never cached)
    keys     k0 = H(-, t0..t15)   k1 = H(k0, t16..t31)   k2 = H(k1, t32..t47)

A request's cached prefix is then the longest run k0, k1, ... found in the table. Entries are evicted least
recently used first, under a capacity in blocks. A lookup or an insert refreshes a prompt's blocks from the
last to the first, so a block is always more recent than the blocks that extend it: eviction takes the tips of
chains first and never leaves a block whose parent is gone.

This module only keeps the table (no torch). In the engine a value is a block of the paged KV cache
(glmkit.engine.blocks): the table holds it as one of its holders (`release` lets go of an evicted one), and a
request whose prompt starts with cached blocks puts those very blocks at the head of its block table, so nothing
is copied or computed again. When the pool runs short, `evict_unshared` gives back the blocks that only this table
still holds, least recently used first.

The order of lookups and inserts decides everything here, with no clock or randomness: tensor-parallel ranks
that replay the same runner calls hold the same table.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

BLOCK_SIZE = 16  # tokens per cached block: a smaller block reuses more of a prefix, a larger one costs less per hit
DEFAULT_PREFIX_CACHE_MB = 512  # glmkit serve --prefix-cache-mb: the whole model's keys and values, all layers


def block_keys(ids: Sequence[int], block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The chained key of every full block of `ids` (the partial tail block has none)."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        tokens = array("q", ids[start:start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of keys and values by chained block key (block_keys), least recently used evicted first."""

    def __init__(self, capacity_blocks: int, block_size: int = BLOCK_SIZE,
                 release: Callable[[Any], None] = lambda value: None) -> None:
        if capacity_blocks < 1 or block_size < 1:
            raise ValueError("a prefix cache needs room for at least one block of at least one token")
        self.capacity, self.block_size, self.release = capacity_blocks, block_size, release
        self.blocks: OrderedDict[bytes, Any] = OrderedDict()  # least recently used first
        self.queried_tokens = 0  # prompt tokens of every lookup
        self.hit_tokens = 0  # of those, the tokens whose keys and values came from here

    def lookup(self, keys: Sequence[bytes]) -> list[Any]:
        """The values of the longest run of `keys` (a prompt's block_keys, from the first) held here."""
        found = []
        for key in keys:
            if key not in self.blocks:
                break
            found.append(key)
        self._refresh(found)
        return [self.blocks[key] for key in found]

    def count(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Record one lookup's outcome: of `prompt_tokens`, `hit_tokens` were not computed again."""
        self.queried_tokens += prompt_tokens
        self.hit_tokens += hit_tokens

    def insert(self, keys: Sequence[bytes], read: Callable[[int], Any]) -> int:
        """Hold the blocks of a prompt whose block_keys are `keys`: read(i) gives block i's value, called only for
        the blocks not held yet. A prompt longer than the whole capacity keeps its first `capacity` blocks (those
        are the ones the next lookup can reach). Returns how many blocks were added."""
        keys = list(keys[:self.capacity])
        self._refresh([key for key in keys if key in self.blocks])  # out of the way of the evictions below
        missing = [i for i, key in enumerate(keys) if key not in self.blocks]
        while len(self.blocks) + len(missing) > self.capacity:
            self.release(self.blocks.popitem(last=False)[1])
        for i in missing:
            self.blocks[keys[i]] = read(i)
        self._refresh(keys)
        return len(missing)

    def evict_unshared(self, count: int, unshared: Callable[[Any], bool]) -> int:
        """Evict up to `count` blocks for which unshared(value) holds (nobody but this table holds them), least
        recently used first; returns how many went."""
        victims = [key for key, value in self.blocks.items() if unshared(value)][:count]
        for key in victims:
            self.release(self.blocks.pop(key))
        return len(victims)

    def _refresh(self, keys: Sequence[bytes]) -> None:
        """Mark a chain's blocks as just used, its first block the most recent of all."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def __len__(self) -> int:
        return len(self.blocks)
