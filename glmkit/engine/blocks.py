"""Which KV-cache blocks each request holds: the engine's side of the paged cache (glmkit.models.paged). No torch.

The pool has `num_blocks` blocks of `block_size` tokens. Block 0 is never handed out: it stays zero and pads the
block tables of shorter rows when several requests attend together. A block is counted by its holders (the
requests whose tables name it, and the prefix cache), and goes back to the free list when the last one lets go;
only full blocks are ever shared, and nothing writes into a full block, so shared blocks need no copy on write.
The free list is last in, first out: a freed block, whose memory the operating system has already backed, is the
next one handed out, so the pool's resident size follows the most blocks in use at once.
"""

from __future__ import annotations

from collections.abc import Sequence

NULL_BLOCK = 0


def blocks_for(tokens: int, block_size: int) -> int:
    """How many blocks hold `tokens` tokens."""
    return -(-tokens // block_size)


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a paged KV cache needs at least 2 blocks (one is the padding block) of >= 1 token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # popped from the end: 1, 2, ...
        self.holders = [0] * num_blocks

    @property
    def usable(self) -> int:
        """Blocks a request may ever hold: all but the padding block."""
        return self.num_blocks - 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks, each held once; None (and nothing taken) when fewer are free."""
        if count > len(self.free):
            return None
        blocks = [self.free.pop() for _ in range(count)]
        for block in blocks:
            self.holders[block] = 1
        return blocks

    def share(self, blocks: Sequence[int]) -> None:
        """One more holder for each block (a request reusing cached blocks, or the prefix cache keeping them)."""
        for block in blocks:
            assert self.holders[block] > 0, f"block {block} is free: it cannot be shared"
            self.holders[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One holder fewer for each block; a block nobody holds is free again."""
        for block in reversed(blocks):  # the table's first block ends up on top of the free list
            assert self.holders[block] > 0, f"block {block} released more often than it was held"
            self.holders[block] -= 1
            if self.holders[block] == 0:
                self.free.append(block)

    @property
    def in_use(self) -> int:
        return self.usable - len(self.free)
