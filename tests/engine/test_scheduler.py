"""The batching policy alone: no model, no torch tensors. Blocks of 4 tokens keep the arithmetic small."""

import pytest

from glmkit.engine.blocks import BlockAllocator
from glmkit.engine.request import Request
from glmkit.engine.scheduler import QueueFull, Scheduler
from glmkit.generation.sampling import SamplingParams


def req(name: str, prompt: int = 2, budget: int = 4) -> Request:
    return Request(name, list(range(1, prompt + 1)), SamplingParams(), budget=budget)


def run_step(s: Scheduler):
    """What the engine does with a plan, without a model: each decoding request feeds a token and gets one back,
    the chunk is encoded (and a completed prompt samples its first token)."""
    plan = s.schedule()
    for _, request in plan.decoding:
        request.computed += 1
        request.output_ids.append(7)
    for chunk in plan.chunks:
        s.encoded(chunk)
        if chunk.completes and not chunk.request.output_ids:
            chunk.request.output_ids.append(7)
    return plan


def test_admits_oldest_first_while_the_step_budget_and_the_batch_last():
    s = Scheduler(max_batch=2, max_queue=5, step_tokens=3)
    for name in "abc":
        s.add(req(name))
    plan = run_step(s)  # a's 2 prompt tokens fit the budget of 3, b's next 2 start there too (1 left: a block)
    assert [(slot, r.request_id) for slot, r in plan.admitted] == [(0, "a"), (1, "b")] and plan.decoding == []
    assert [(c.slot, c.start, c.stop) for c in plan.chunks] == [(0, 0, 2), (1, 0, 2)]
    plan = run_step(s)  # the batch is full: c waits
    assert plan.admitted == [] and plan.chunks == []
    assert [(slot, r.request_id) for slot, r in plan.decoding] == [(0, "a"), (1, "b")]


def test_a_prompt_that_starts_like_one_admitted_in_this_step_waits_to_share_its_blocks():
    from glmkit.engine.prefix_cache import PrefixCache

    blocks = BlockAllocator(20, 4)
    s = Scheduler(max_batch=3, max_queue=3, blocks=blocks, step_tokens=64,
                  prefix_cache=PrefixCache(8, 4, release=lambda b: blocks.release([b])))
    system = [9, 9, 9, 9, 8, 8, 8, 8]
    s.add(Request("a", [*system, 1], SamplingParams(), budget=2))
    s.add(Request("b", [*system, 2], SamplingParams(), budget=2))
    s.add(Request("c", [5, 5, 5, 5, 1], SamplingParams(), budget=2))
    plan = run_step(s)
    assert [r.request_id for _, r in plan.admitted] == ["a"]  # b starts like a, and c queues behind b
    plan = run_step(s)
    assert [r.request_id for _, r in plan.admitted] == ["b", "c"] and plan.admitted[0][1].cached_tokens == 8


def test_a_finished_request_frees_its_slot_and_blocks_by_moving_the_last_one_in():
    s = Scheduler(max_batch=3, max_queue=5, blocks=BlockAllocator(20, 4))
    for name in "abcd":
        s.add(req(name))
    for _ in range(3):
        run_step(s)
    a = s.running[0]
    held = s.blocks.in_use
    assert s.finish(a) == (2, 0)  # c moves from slot 2 into slot 0
    assert s.blocks.in_use == held - 1 and a.blocks == []
    assert [r.request_id for r in s.running] == ["c", "b"]
    plan = s.schedule()
    assert [(slot, r.request_id) for slot, r in plan.admitted] == [(2, "d")]
    assert [r.request_id for _, r in plan.decoding] == ["c", "b"]
    assert s.finish(s.running[2]) is None  # the last slot needs no move


def test_queue_bound_counts_free_slots():
    s = Scheduler(max_batch=1, max_queue=1)
    s.add(req("a"))
    s.add(req("b"))  # a takes the free slot at the next step, b waits
    with pytest.raises(QueueFull, match="max_queue 1"):
        s.add(req("c"))
    s.schedule()
    with pytest.raises(QueueFull):
        s.add(req("c"))
    assert s.abort_waiting("b").request_id == "b"
    s.add(req("c"))


def test_invalid_sizes():
    with pytest.raises(ValueError):
        Scheduler(max_batch=0, max_queue=1)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockAllocator(1, 4)


def test_a_request_the_pool_can_never_hold_is_refused_with_what_to_do():
    s = Scheduler(max_batch=2, max_queue=2, blocks=BlockAllocator(4, 4))  # 3 usable blocks: 12 tokens
    with pytest.raises(ValueError, match="needs 4 KV-cache blocks .* has 3.*--kv-cache-mb"):
        s.add(req("a", prompt=10, budget=6))
    s.add(req("b", prompt=6, budget=6))


def test_a_long_prompt_is_encoded_in_chunks_within_the_step_budget():
    s = Scheduler(max_batch=3, max_queue=3, blocks=BlockAllocator(40, 4), step_tokens=10)
    s.add(req("short", prompt=3, budget=20))
    run_step(s)
    s.add(req("long", prompt=30, budget=2))
    chunks = []
    while not s.running[1:] or not s.running[1].encoded:
        plan = run_step(s)
        [chunk] = plan.chunks
        chunks.append((chunk.start, chunk.stop, len(plan.decoding)))
    # each step: one decode token of "short" and at most 9 prompt tokens
    assert chunks == [(0, 9, 1), (9, 18, 1), (18, 27, 1), (27, 30, 1)]


def test_a_chunk_always_advances_by_at_least_a_block():
    s = Scheduler(max_batch=4, max_queue=4, blocks=BlockAllocator(40, 4), step_tokens=2)
    for name in "ab":
        s.add(req(name, prompt=2, budget=20))
    run_step(s)
    run_step(s)
    s.add(req("c", prompt=10, budget=2))
    plan = run_step(s)
    assert len(plan.decoding) == 2 and [(c.start, c.stop) for c in plan.chunks] == [(0, 4)]


def test_admission_waits_for_free_blocks_instead_of_failing():
    s = Scheduler(max_batch=4, max_queue=4, blocks=BlockAllocator(4, 4))  # 3 usable blocks
    s.add(req("a", prompt=8, budget=4))  # 2 blocks for its prompt
    s.add(req("b", prompt=8, budget=4))
    run_step(s)
    plan = run_step(s)
    assert plan.admitted == [] and [r.request_id for r in s.waiting] == ["b"]
    s.finish(s.running[0])
    plan = run_step(s)
    assert [r.request_id for _, r in plan.admitted] == ["b"]


def test_the_last_slot_is_preempted_when_a_decoding_request_needs_a_block_and_none_is_free():
    s = Scheduler(max_batch=2, max_queue=2, blocks=BlockAllocator(4, 4))  # 3 usable blocks of 4 tokens
    a, b = req("a", prompt=4, budget=8), req("b", prompt=4, budget=8)
    s.add(a)
    s.add(b)
    run_step(s)  # both prompts encoded (a block each), first tokens
    assert s.blocks.in_use == 2
    plan = run_step(s)  # a feeds at position 4: the third block; b too, but none is left: b (last slot) goes
    assert [(slot, r.request_id) for slot, r in plan.preempted] == [(1, "b")]
    assert b.preempted and b.blocks == [] and b.computed == 0 and list(s.waiting) == [b]
    assert [r.request_id for _, r in plan.decoding] == ["a"] and s.preemptions == 1
    s.finish(a)
    plan = run_step(s)  # b comes back: its prompt and its reply but the token it feeds next
    assert [r.request_id for _, r in plan.admitted] == ["b"]
    assert b.prefill_ids == [*b.prompt_ids, *b.output_ids[:-1]] and plan.chunks[0].stop == len(b.prefill_ids)


def test_a_prefix_lm_request_takes_its_whole_budget_at_admission_and_its_prompt_in_one_piece():
    s = Scheduler(max_batch=2, max_queue=2, blocks=BlockAllocator(10, 4), step_tokens=4, chunked=False)
    s.add(req("a", prompt=10, budget=7))
    plan = run_step(s)
    assert [(c.start, c.stop) for c in plan.chunks] == [(0, 10)] and len(s.running[0].blocks) == 5  # 17 tokens
    for _ in range(6):
        assert run_step(s).preempted == []
    assert s.blocks.in_use == 5
