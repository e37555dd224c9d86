"""The batching policy alone: no model, no torch tensors."""

import pytest

from glmkit.engine.request import Request
from glmkit.engine.scheduler import QueueFull, Scheduler
from glmkit.generation.sampling import SamplingParams


def req(name: str) -> Request:
    return Request(name, [1, 2], SamplingParams(), budget=4)


def test_admits_oldest_first_up_to_the_batch_size():
    s = Scheduler(max_batch=2, max_queue=5)
    for name in "abc":
        s.add(req(name))
    plan = s.schedule()
    assert [(slot, r.request_id) for slot, r in plan.admitted] == [(0, "a"), (1, "b")]
    assert plan.decoding == []
    plan = s.schedule()
    assert plan.admitted == [] and [r.request_id for r in plan.decoding] == ["a", "b"]


def test_a_finished_request_frees_its_slot_by_moving_the_last_one_in():
    s = Scheduler(max_batch=3, max_queue=5)
    for name in "abcd":
        s.add(req(name))
    s.schedule()
    a = s.running[0]
    assert s.finish(a) == (2, 0)  # c moves from slot 2 into slot 0
    assert [r.request_id for r in s.running] == ["c", "b"]
    plan = s.schedule()
    assert [(slot, r.request_id) for slot, r in plan.admitted] == [(2, "d")]
    assert [r.request_id for r in plan.decoding] == ["c", "b"]
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
